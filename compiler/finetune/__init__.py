"""compiler/finetune: fine-tune a QuantizedModel to its plan (LSQ QAT, distillation, PD-QAT, energy, d/x_max).

Typical use::

    q = prepare(captured, assignment, data, config)     # quantizers at the plan's bits, ranges calibrated
    result = finetune(q, teacher, data, config)          # trained in place; checkpoints, resume, DDP

The captured graph has BatchNorm folded into the convolutions (``capture(..., fold_bn=True)``): there is no BN
to put in train mode, and its statistics are frozen for the whole run (see ``FinetuneConfig``).
"""

from .config import (
    DistillConfig,
    DxmaxConfig,
    EnergyConfig,
    EnergyMode,
    FinetuneConfig,
    Method,
    Optimizer,
    PDQATConfig,
    RangeInit,
    Scheduler,
)
from .ddp import DistContext, init_distributed
from .deploy_tail import DeployTail
from .driver import (
    FinetuneResult,
    Objective,
    accuracy,
    apply_plan,
    assignment_from_plan,
    checkpoint_path,
    finetune,
    load_checkpoint,
    prepare,
    register_objective,
)
from .dxmax import DxmaxObjective, DxmaxQuantizer, quantized_memory_kb
from .energy import EnergyObjective, LayerNoise, NoiseInjector, evaluate_at_energy
from .pdqat import PDQATObjective, rank_layers
from .renorm import BatchRenorm, Renormalizer

__all__ = [
    "BatchRenorm",
    "DeployTail",
    "DistContext",
    "DistillConfig",
    "DxmaxConfig",
    "DxmaxObjective",
    "DxmaxQuantizer",
    "EnergyConfig",
    "EnergyMode",
    "EnergyObjective",
    "FinetuneConfig",
    "FinetuneResult",
    "LayerNoise",
    "Method",
    "NoiseInjector",
    "Objective",
    "Optimizer",
    "PDQATConfig",
    "PDQATObjective",
    "RangeInit",
    "Renormalizer",
    "Scheduler",
    "accuracy",
    "apply_plan",
    "assignment_from_plan",
    "checkpoint_path",
    "evaluate_at_energy",
    "finetune",
    "init_distributed",
    "load_checkpoint",
    "prepare",
    "quantized_memory_kb",
    "rank_layers",
    "register_objective",
]
