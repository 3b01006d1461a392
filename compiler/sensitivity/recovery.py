"""How much of each kind's quantization damage fine-tuning wins back: the weight/activation ratio for the search.

Every sensitivity method measures the loss of quantizing the float model as it stands, which is what
post-training quantization sees. Fine-tuning changes the balance: weights move onto their grid and recover
most of their damage, activations of a fixed network recover far less. On the CIFAR-10 ResNet-20 every method
rates 2-bit weights 3-15x as harmful as 2-bit activations, while after LSQ fine-tuning the order is reversed
(bench/RESULTS.md, session 4), so plans searched on the raw scores buy weight bits with activation bits and
lose to uniform precision once fine-tuned.

The probe measures the factor instead of guessing it. Three short fine-tunings from the calibrated model, with
the compile's own recipe (LSQ with its optimizer, lr, batch size, batch statistics and distillation),
cosine-annealed over ``steps`` batches: a reference with every probed layer at the widest width, one with the
probed weights at the smallest weight width (activations widest), one with the probed activations at the
smallest activation width (weights widest). On held-out training images, each probe's excess loss over the
reference before (``d0``) and after (``dK``) fine-tuning gives the fraction that stays, ``rho = dK / d0`` (the
reference cancels what the recipe itself does to the loss in so few steps); the search then weighs weight scores
by ``alpha = rho_w / rho_a`` (the plan's `--weight-alpha`). The first and last layers and every ``--fix`` layer
keep their fixed or widest precision in all three: an image at 2 bits or a 2-bit classifier would dominate the
losses, and the search rarely moves them anyway.

A probe is far shorter than the fine-tuning it stands for, and weights keep recovering long after the
activations have settled, so the measured alpha is an upper bound on the one the full fine-tuning would show
(between 1 and it); longer probes move it down (bench/RESULTS.md, session 5).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

RHO_FLOOR = 1e-3  # a probe that ends at or below the float loss keeps at least this fraction (no zero alpha)


@dataclass(frozen=True)
class ProbeConfig:
    """The recipe of the probe fine-tunings (the compile passes its own fine-tuning settings).

    ``steps`` batches each, fewer when the training split less the ``eval_samples`` held-out images is smaller
    (the probes never repeat an image)."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    batch_stats: bool = True
    distill: bool = True
    eval_samples: int = 2048
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"probe steps must be an integer >= 1, not {self.steps!r}")
        if not (isinstance(self.eval_samples, int) and self.eval_samples >= 1):
            raise ValueError(f"probe eval_samples must be an integer >= 1, not {self.eval_samples!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"probe lr must be a finite number > 0, not {self.lr!r}")


@dataclass
class Recovery:
    """The three probes' losses and the factors they give (``alpha`` multiplies the weight scores)."""

    w_bits: int
    a_bits: int
    high_bits: int
    probed: list[str]
    held: dict[str, list]
    loss_fp: float
    ref_before: float
    ref_after: float
    w_before: float
    w_after: float
    a_before: float
    a_after: float
    steps: int
    train_images: int
    eval_images: int
    time_s: float
    config: dict = field(default_factory=dict)

    @property
    def rho_w(self) -> float:
        return _rho(self.w_before - self.ref_before, self.w_after - self.ref_after)

    @property
    def rho_a(self) -> float:
        return _rho(self.a_before - self.ref_before, self.a_after - self.ref_after)

    @property
    def alpha(self) -> float:
        return self.rho_w / self.rho_a

    def to_dict(self) -> dict:
        return {**asdict(self), "rho_w": self.rho_w, "rho_a": self.rho_a, "alpha": self.alpha}


def _rho(d0: float, dk: float) -> float:
    """The fraction of the excess loss (over the reference probe) that fine-tuning left, in [RHO_FLOOR, 1]."""
    if not (d0 > 0):  # quantizing did not hurt at all: nothing to recover, weigh the scores as measured
        return 1.0
    return min(1.0, max(RHO_FLOOR, dk / d0))


@torch.no_grad()
def _loss(model, x: torch.Tensor, y: torch.Tensor, device, batch: int = 256) -> float:
    was = model.training
    model.train(False)
    home = next(iter(model.parameters())).device
    model.to(device)
    total = 0.0
    try:
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch].to(device))
            total += float(F.cross_entropy(out.float(), y[i:i + batch].to(device), reduction="sum"))
    finally:
        model.to(home)
        model.train(was)
    return total / max(1, len(x))


def probe_assignment(graph, *, w_bits: int | None, a_bits: int | None, high_bits: int,
                     held: dict[str, tuple[int | None, int | None]]) -> dict:
    """``{layer: LayerQuant}``: probed layers at (w_bits or high, a_bits or high), held layers at their pair."""
    from mpqc.compiler.ir import OpKind
    from mpqc.compiler.quantize import LayerQuant

    out = {}
    for op in graph.layers():
        w, a = held.get(op.name, (w_bits if w_bits is not None else high_bits,
                                  a_bits if a_bits is not None else high_bits))
        if op.kind == OpKind.MATMUL:
            w = None
        elif op.kind == OpKind.EMBEDDING:
            a = None
        out[op.name] = LayerQuant(w, a)
    return out


def held_layers(graph, fix: dict, high_bits: int) -> dict[str, tuple[int | None, int | None]]:
    """Layers the probes keep out: the first and last quantizable layers at ``high_bits`` and every ``--fix``
    match at its fixed widths (a side the fix leaves open at ``high_bits``)."""
    import fnmatch

    layers = graph.layers()
    held: dict[str, tuple[int | None, int | None]] = {}
    first, last = graph.end_layers()
    for name in first + last:  # every stem and every head
        held[name] = (high_bits, high_bits)
    for op in layers:
        for pat, d in fix.items():
            if fnmatch.fnmatchcase(op.name, pat):
                w = d.get("w") if d.get("w") is not None else high_bits
                a = d.get("a") if d.get("a") is not None else high_bits
                held[op.name] = (w, a)
    return held


def probe_recovery(captured, teacher, data, *, w_bits: int, a_bits: int, high_bits: int = 8,
                   fix: dict | None = None, config: ProbeConfig = ProbeConfig(), act_groups: str = "tensor",
                   progress: bool = False) -> Recovery:
    """Run the weight probe and the activation probe (see the module docstring); returns their losses."""
    from mpqc.compiler.data import DataSplits
    from mpqc.compiler.finetune import DistillConfig, FinetuneConfig, finetune, prepare

    t0 = time.perf_counter()
    graph = captured.graph
    held = held_layers(graph, fix or {}, high_bits)
    probed = [op.name for op in graph.layers() if op.name not in held]
    if not probed:
        raise ValueError("every quantizable layer is fixed or at an end of the graph: nothing for the probe to "
                         "measure; give numbers to --weight-alpha instead of auto")
    xt, yt = data.train.tensors
    n_eval = min(config.eval_samples, max(1, len(xt) // 4))
    g = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(xt), generator=g)
    ev, tr = perm[:n_eval], perm[n_eval:n_eval + config.batch_size * config.steps]
    if len(tr) < config.batch_size:
        raise ValueError(f"the training split ({len(xt)} samples) leaves less than one probe batch of "
                         f"{config.batch_size} after {n_eval} held-out samples")
    x_ev, y_ev = xt[ev], yt[ev]
    subset = DataSplits(data.name, TensorDataset(xt[tr], yt[tr]), data.calib, TensorDataset(x_ev, y_ev),
                        data.num_classes, data.augment)
    device = torch.device(config.device)
    loss_fp = _loss(teacher, x_ev, y_ev, device)
    cfg = FinetuneConfig(epochs=1, lr=config.lr, optimizer=config.optimizer, batch_size=config.batch_size,
                         batch_stats=config.batch_stats, seed=config.seed, checkpoint_dir=None,
                         device=device.type, distill=DistillConfig(enabled=config.distill))
    losses = {}
    for kind, wb, ab in (("ref", None, None), ("w", w_bits, None), ("a", None, a_bits)):
        assignment = probe_assignment(graph, w_bits=wb, a_bits=ab, high_bits=high_bits, held=held)
        q = prepare(copy.deepcopy(captured), assignment, data, cfg, act_groups=act_groups)
        before = _loss(q, x_ev, y_ev, device)
        finetune(q, teacher, subset, cfg, progress=progress)
        losses[kind] = (before, _loss(q, x_ev, y_ev, device))
    return Recovery(w_bits=w_bits, a_bits=a_bits, high_bits=high_bits, probed=probed,
                    held={k: list(v) for k, v in held.items()}, loss_fp=loss_fp,
                    ref_before=losses["ref"][0], ref_after=losses["ref"][1],
                    w_before=losses["w"][0], w_after=losses["w"][1], a_before=losses["a"][0],
                    a_after=losses["a"][1], steps=len(tr) // config.batch_size, train_images=len(tr),
                    eval_images=n_eval, time_s=time.perf_counter() - t0, config=asdict(config))
