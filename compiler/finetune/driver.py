"""The fine-tuning driver: one loop, with the method (LSQ, PD-QAT, energy, d/x_max) as a pluggable objective.

``finetune(qmodel, teacher, data, config)`` trains a :class:`~mpqc.compiler.quantize.QuantizedModel` in place.
The captured graph is an inference graph: BatchNorm was folded into the convolutions at capture
(``capture(..., fold_bn=True)``), so there is no BN to switch to train mode and its statistics stay frozen
throughout; ``QuantizedModel.train()`` only switches the quantizers. What is trained: the (folded) weights and
biases, and the quantizers' step sizes with LSQ's gradient from the kernels (``mpqc.kernels.fake_quant``,
"auto" backend: the PyTorch reference on the CPU, Triton on CUDA).

Each method is an :class:`Objective` registered against its :class:`~.config.Method` (no ``isinstance``
ladders here): it may change the model for the run (attach noise, swap quantizers), chooses the parameters,
turns a batch into a loss, and acts at epoch ends (PD-QAT's dual ascent).

Checkpoints: after every epoch ``<checkpoint_dir>/last.pt`` is replaced atomically (temp file + ``os.replace``)
with the model and quantizer state, optimizer, scheduler, the objective's state (duals, noise counters), the
RNG states and the metrics so far. A killed run started again with the same config resumes there and loses at
most the epoch in progress; data order, augmentation and noise of epoch e depend only on (seed, e), so the
resumed run ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpqc.compiler.data import DataSplits, augment_batch, make_loader
from mpqc.compiler.loading import set_eval
from mpqc.compiler.progress import progress_bar
from mpqc.compiler.quantize import LayerQuant, QuantizedModel, RangeMethod

from . import ddp
from .config import DistillConfig, FinetuneConfig, Method, Optimizer, Scheduler

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "mpqc-finetune-checkpoint"
CHECKPOINT_VERSION = 1

Callback = Callable[[str, dict], None]
SYNC_EVERY = 25  # steps between host syncs (loss check, progress): each sync drains the GPU queue


@dataclass
class FinetuneResult:
    """What a run produced: per-epoch metrics, the final validation accuracy (%), the last checkpoint.

    ``summary`` holds the method's outputs: ``deploy_tail`` (LSQ), ``duals``/``dual_out`` (PD-QAT),
    ``emac``/``e_bar`` (energy), ``bits``/``weight_kb``/``act_kb`` (d/x_max). ``resumed_from`` is the number of
    epochs a checkpoint already held, or None for a fresh run.
    """

    metrics: list[dict]
    final_accuracy: float
    checkpoint: str | None
    resumed_from: int | None = None
    summary: dict = field(default_factory=dict)

    @property
    def duals(self) -> dict[str, float] | None:
        return self.summary.get("duals")

    @property
    def emac(self) -> dict | None:
        return self.summary.get("emac")

    @property
    def bits(self) -> dict | None:
        return self.summary.get("bits")


# --------------------------------------------------------------------------------------------------------
# losses
def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean",
                    log_target=True) * (t * t)


def task_loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
              distill: DistillConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy, mixed with distillation from the float teacher when enabled: (1 - w) CE + w T^2 KL.

    The parts come back as detached tensors: turning them into floats here would stall the GPU every step.
    """
    ce = F.cross_entropy(logits, y)
    if not distill.enabled or teacher_logits is None or distill.weight == 0:
        return ce, {"ce": ce.detach()}
    kd = distill_loss(logits, teacher_logits, distill.temperature)
    w = distill.weight
    return (1 - w) * ce + w * kd, {"ce": ce.detach(), "kd": kd.detach()}


# --------------------------------------------------------------------------------------------------------
# objectives
_OBJECTIVES: dict[Method, type[Objective]] = {}


def register_objective(method: Method):
    """Class decorator: make ``cls`` the objective that ``FinetuneConfig(method=method)`` runs."""

    def deco(cls):
        _OBJECTIVES[Method(method)] = cls
        cls.method = Method(method)
        return cls

    return deco


class Objective:
    """LSQ QAT (seeds.md 3.1), and the base every method extends.

    Trained: the weights and biases, and the step size of every enabled quantizer (LSQ gradient with scale
    1/sqrt(Qp N) from the kernel). Weight decay applies to weight tensors only. Loss: CE, plus distillation
    from the float teacher when ``config.distill.enabled``.
    """

    method = Method.LSQ

    def __init__(self, qmodel: QuantizedModel, teacher: nn.Module | None, data: DataSplits, config: FinetuneConfig,
                 ctx: ddp.DistContext, emac: dict | None = None):
        self.q = qmodel
        self.teacher = teacher
        self.data = data
        self.config = config
        self.ctx = ctx
        self.emac = emac
        self.freeze_scales = False
        self._grad_flags: dict[int, tuple[nn.Parameter, bool]] = {}

    # -- set-up and teardown ---------------------------------------------------------------------------
    @property
    def uses_teacher(self) -> bool:
        return self.config.distill.enabled and self.config.distill.weight > 0

    def setup(self) -> None:
        """Prepare the model for this method; parameters that cannot get a gradient stop requiring one (DDP)."""
        self.remember_grad_flags()
        for q in self.quantizers():
            if not q.enabled:
                for p in q.parameters():
                    p.requires_grad_(False)

    def remember_grad_flags(self) -> None:
        """Record every parameter's ``requires_grad`` (restored by :meth:`finish`)."""
        for p in self.q.parameters():
            self._grad_flags.setdefault(id(p), (p, p.requires_grad))

    def finish(self) -> dict:
        """Undo temporary changes to the model; return the method's summary (JSON-friendly).

        A ``"final_accuracy"`` entry, when present, replaces the driver's plain evaluation afterwards.
        """
        for p, flag in self._grad_flags.values():
            p.requires_grad_(flag)
        return {}

    def abort(self) -> None:
        """Restore the model after a failed or interrupted run (the checkpoint keeps the progress)."""
        self.finish()

    # -- parameters ------------------------------------------------------------------------------------
    def quantizers(self) -> list[nn.Module]:
        """Every weight and activation quantizer module of the model."""
        return list(self.q.wq.values()) + self.q.act_quantizers_all()

    def quant_params(self) -> list[nn.Parameter]:
        """Quantizer parameters being learned (step sizes, or d and x_max), enabled quantizers only."""
        return [p for q in self.quantizers() if q.enabled for p in q.parameters() if p.requires_grad]

    def model_params(self) -> list[nn.Parameter]:
        """Trainable parameters of the network itself (weights and biases)."""
        qids = {id(p) for q in self.quantizers() for p in q.parameters()}
        return [p for p in self.q.gm.parameters() if p.requires_grad and id(p) not in qids]

    def param_groups(self) -> list[dict]:
        """Optimizer groups: weights (with weight decay), biases, quantizer parameters (``quant_lr``)."""
        cfg = self.config
        weights, biases = [], []
        for p in self.model_params():
            (weights if p.dim() > 1 else biases).append(p)
        groups = [{"params": weights, "weight_decay": cfg.weight_decay, "name": "weights"},
                  {"params": biases, "weight_decay": 0.0, "name": "biases"},
                  {"params": self.quant_params(), "weight_decay": 0.0, "name": "quant",
                   "lr": cfg.quant_lr if cfg.quant_lr is not None else cfg.lr}]
        return [g for g in groups if g["params"]]

    def build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The configured optimizer over ``groups``."""
        cfg = self.config
        if cfg.optimizer == Optimizer.SGD:
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        if cfg.optimizer == Optimizer.ADAM:
            return torch.optim.Adam(groups, lr=cfg.lr)
        return torch.optim.AdamW(groups, lr=cfg.lr)

    # -- one step --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Runs inside the (possibly DDP-wrapped) module: logits and any tensors the loss needs."""
        return self.q(x), {}

    def loss(self, logits: torch.Tensor, aux: dict, y: torch.Tensor,
             teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise and its parts (floats, for the metrics)."""
        return task_loss(logits, y, teacher_logits, self.config.distill)

    def after_backward(self) -> None:
        """Gradients are final (reduced over ranks): frozen step sizes drop theirs so the optimizer skips them."""
        if self.freeze_scales:
            for p in self.frozen_in_last_epochs():
                p.grad = None

    def frozen_in_last_epochs(self) -> list[nn.Parameter]:
        """What ``freeze_bn_last_epochs`` freezes: the quantizers' learned ranges."""
        return self.quant_params()

    def after_step(self) -> None:
        """Projection after the optimizer step (ranges, clamps)."""

    # -- epochs ----------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch's first step."""
        n = self.config.freeze_bn_last_epochs
        self.freeze_scales = n > 0 and epoch >= self.config.epochs - n

    def end_epoch(self, epoch: int) -> dict:
        """Called after each epoch's last step; returns extra metrics."""
        return {}

    def evaluate(self, ds) -> float:
        """Validation accuracy (%) of the model as this method defines it (e.g. under noise)."""
        return accuracy(self.q, ds, batch_size=self.config.eval_batch_size, device=self.ctx.device)

    def state_dict(self) -> dict:
        """State to checkpoint besides the model (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


register_objective(Method.LSQ)(Objective)


def objective_for(method: Method) -> type[Objective]:
    """The objective class registered for ``method``."""
    from . import dxmax, energy, pdqat  # noqa: F401  (importing registers them)

    return _OBJECTIVES[Method(method)]


class _Student(nn.Module):
    """What DDP wraps: the quantized model, run through the objective's forward."""

    def __init__(self, qmodel: QuantizedModel, objective: Objective):
        super().__init__()
        self.qmodel = qmodel
        self.objective = objective  # a plain object, not a submodule

    def forward(self, x):
        return self.objective.forward(x)


# --------------------------------------------------------------------------------------------------------
# preparing a model
def assignment_from_plan(plan) -> tuple[dict[str, LayerQuant], dict[str, float | list[float]]]:
    """``({layer: LayerQuant}, {layer: emac})`` from a :class:`mpqc.compiler.plan.Plan`."""
    assignment, emac = {}, {}
    for name, lp in plan.layers.items():
        w = tuple(lp.w_bits) if isinstance(lp.w_bits, list) else lp.w_bits
        assignment[name] = LayerQuant(w, lp.a_bits)
        if lp.emac is not None:
            emac[name] = lp.emac
    return assignment, emac


def apply_plan(qmodel: QuantizedModel, plan) -> dict[str, float | list[float]]:
    """Set every layer (and shared activation tensor) of ``qmodel`` to the plan's precision; returns the emac map."""
    _, emac = assignment_from_plan(plan)
    qmodel.apply_plan(plan)
    return emac


def prepare(captured, assignment: dict[str, LayerQuant], data: DataSplits, config: FinetuneConfig, *,
            act_groups: str = "tensor") -> QuantizedModel:
    """A calibrated QuantizedModel of ``captured`` at ``assignment``, ranges initialised by ``config.range_init``."""
    method = RangeMethod(config.range_init.value)
    q = QuantizedModel(captured, act_groups=act_groups, method=method)
    q.apply(assignment)
    q.calibrate(make_loader(data.calib, config.eval_batch_size), method=method, max_batches=config.calib_batches)
    return q


# --------------------------------------------------------------------------------------------------------
# checkpoints
def checkpoint_path(config: FinetuneConfig) -> str | None:
    """Where this config's run keeps its last checkpoint (None: checkpoints off)."""
    return os.path.join(config.checkpoint_dir, CHECKPOINT_NAME) if config.checkpoint_dir else None


def precision_signature(q: QuantizedModel) -> dict:
    """What the state dict does not hold but a resume must match: which quantizers are on, at which bits."""
    sig: dict = {}
    for k, m in q.wq.items():
        sig[f"wq.{k}"] = [bool(m.enabled), [int(b) for b in m.bits]]
    for k, m in q.aq.items():
        sig[f"aq.{k}"] = m.bits
    for k, m in q.rq.items():
        sig[f"rq.{k}"] = m.bits
    return sig


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, payload: dict) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never a half-written file."""
    from mpqc.atomic import atomic_write_with

    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an mpqc fine-tuning checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')!r} is not {CHECKPOINT_VERSION}")
    return payload


def load_model_state(module: nn.Module, state: dict) -> None:
    """``load_state_dict`` that first resizes buffers whose size legitimately varies (calibration samples)."""
    own = dict(module.named_buffers(remove_duplicate=False))
    for name, value in state.items():
        buf = own.get(name)
        if buf is not None and buf.shape != value.shape:
            mod_path, _, leaf = name.rpartition(".")
            mod = module.get_submodule(mod_path) if mod_path else module
            setattr(mod, leaf, torch.empty_like(value, device=buf.device))
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------
# the loop
@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], ds, *, batch_size: int = 256,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` over a tensor data set, batches moved to ``device``."""
    correct = n = 0
    for x, y in make_loader(ds, batch_size):
        out = model(x.to(device))
        correct += int((out.argmax(-1).cpu() == y).sum())
        n += len(y)
    return 100.0 * correct / max(1, n)


def _frozen_teacher(teacher: nn.Module | None, qmodel: QuantizedModel, device) -> nn.Module | None:
    """The teacher in eval mode; copied first when it shares storage with the student or lives elsewhere.

    ``torch.export`` keeps un-folded parameters (e.g. the classifier) as the very tensors of the model it
    traced, so training the student would otherwise move the teacher too.
    """
    if teacher is None:
        return None
    own = {p.data_ptr() for p in qmodel.parameters()}
    tensors = list(teacher.parameters()) + list(teacher.buffers())
    if any(p.data_ptr() in own for p in tensors) or any(p.device != device for p in tensors):
        teacher = copy.deepcopy(teacher).to(device)
    # eval mode (an unlifted torch.export module has no switch and stays as it is); gradients are off by running it
    # under no_grad (flags untouched: they may be shared)
    return set_eval(teacher)


def _schedule(config: FinetuneConfig, total_steps: int) -> Callable[[int], float]:
    if config.scheduler == Scheduler.CONSTANT:
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**62)


def finetune(qmodel: QuantizedModel, teacher: nn.Module | None, data: DataSplits, config: FinetuneConfig,
             progress: bool = True, *, emac: dict | None = None, callback: Callback | None = None) -> FinetuneResult:
    """Fine-tune ``qmodel`` in place with ``config.method``; returns metrics and the final accuracy.

    Args:
        qmodel: a QuantizedModel with the plan applied and activation ranges calibrated
            (see :func:`prepare`). Trained in place; it ends on the device it started on. Its graph
            may share un-folded parameters (e.g. the classifier) with the module it was captured from,
            as torch.export keeps them: those train too, so capture a copy to keep the float model.
        teacher: the full-precision model (for distillation, PD-QAT's output constraint); copied when
            it shares parameters with ``qmodel``. May be None for methods that do not need it.
        data: train / calib / val splits; training uses ``data.train``, metrics ``data.val``.
        config: the run's :class:`FinetuneConfig`.
        progress: show rich progress bars (epochs and batches) on the main rank.
        emac: per-layer energy per MAC (float or per-channel list) for the energy method: the initial
            (``learn``) or fixed (``fixed``) allocation; layers missing use ``config.energy.e_init``.
        callback: ``callback(event, info)`` after every step (``"step"``) and epoch (``"epoch"``); an
            exception raised there stops the run like a kill (the last checkpoint stays valid).

    Raises:
        ValueError: a bad combination (teacher missing for PD-QAT, a checkpoint for another plan or
            method, a batch size not divisible by the number of processes).
    """
    ctx = ddp.init_distributed(config.ddp, config.device)
    try:
        return _run(qmodel, teacher, data, config, progress and ctx.is_main, emac, callback, ctx)
    finally:
        ddp.shutdown(ctx)


def _run(qmodel, teacher, data, config, show, emac, callback, ctx) -> FinetuneResult:
    home = next(iter(qmodel.parameters())).device
    device = ctx.device
    torch.manual_seed(config.seed)
    teacher = _frozen_teacher(teacher, qmodel, device)  # before the move: shared storage is detected on home
    qmodel.to(device)
    renorm = tail = None
    if config.batch_stats and config.method in (Method.LSQ, Method.PDQAT):
        from .renorm import Renormalizer

        renorm = Renormalizer(qmodel)
        renorm.calibrate(itertools.islice(make_loader(data.calib, config.eval_batch_size), config.calib_batches),
                         device)
    objective = objective_for(config.method)(qmodel, teacher, data, config, ctx, emac)
    if config.method == Method.PDQAT and teacher is None:
        raise ValueError("PD-QAT needs the float teacher for its output constraint; pass teacher=")
    signature = precision_signature(qmodel)  # before the objective swaps or adds modules
    objective.setup()
    try:
        groups = objective.param_groups()
        if not groups:
            raise ValueError(f"method {config.method.value!r} found no parameters to train")
        optimizer = objective.build_optimizer(groups)
        loader, sampler = ddp.train_loader(data.train, config.batch_size, ctx, config.seed)
        steps = len(loader)
        if steps == 0:
            raise ValueError(f"the training split ({len(data.train)} samples) holds less than one batch of "
                             f"{config.batch_size}; lower --batch-size or use more data")
        total = steps * config.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, total))
        if config.method == Method.LSQ and config.deploy_tail > 0:
            from .deploy_tail import DeployTail, tail_start

            tail = DeployTail(qmodel, renorm, tail_start(config.deploy_tail, total))

        def wrap():
            return ddp.wrap(_Student(qmodel, objective), ctx)

        student = wrap()

        path = checkpoint_path(config)
        start, metrics, resumed = 0, [], None
        state = None
        if path and config.resume and os.path.isfile(path):
            state = _resume(path, qmodel, optimizer, scheduler, objective, config, signature,
                            lambda form: tail is not None and form == tail.form and (tail.enter() or True))
            if tail is not None and tail.changes_graph:
                student = wrap()
        if state is not None:
            start, metrics = state
            resumed = start
            log.info("resuming from %s after epoch %d", path, start)
        elif path and not config.resume and ctx.is_main and os.path.isfile(path):
            os.unlink(path)

        with progress_bar(show, info=True) as bar:
            ep_task = bar.add_task("epochs", total=config.epochs, completed=start, info="")
            for epoch in range(start, config.epochs):
                row, student = _train_epoch(epoch, student, objective, optimizer, scheduler, loader, sampler,
                                            teacher, data, config, ctx, bar, callback, tail, wrap)
                metrics.append(row)
                bar.update(ep_task, advance=1, info=f"val {metrics[-1]['val_acc']:.2f}%")
                if path:
                    if ctx.is_main:
                        save_checkpoint(path, _payload(epoch + 1, qmodel, optimizer, scheduler, objective,
                                                       config, metrics, signature,
                                                       tail.form if tail is not None and tail.active else False))
                    ddp.barrier(ctx)
                if callback:
                    callback("epoch", dict(metrics[-1]))
        qmodel.train(False)
        if renorm is not None:
            renorm.fold()
        if tail is not None:
            tail.leave()
        summary = objective.finish()
        if tail is not None:
            summary["deploy_tail"] = tail.info(total)
    except BaseException:
        qmodel.train(False)
        if renorm is not None:
            renorm.fold()  # the eval-mode model, on the captured graph (the checkpoint keeps the progress)
        if tail is not None:
            tail.leave()
        objective.abort()
        qmodel.train(False)
        qmodel.to(home)
        raise
    final = summary.pop("final_accuracy", None)
    if final is None:
        final = accuracy(qmodel, data.val, batch_size=config.eval_batch_size, device=device)
    qmodel.to(home)
    return FinetuneResult(metrics=metrics, final_accuracy=float(final), checkpoint=path, resumed_from=resumed,
                          summary=summary)


def _train_epoch(epoch, student, objective, optimizer, scheduler, loader, sampler, teacher, data, config, ctx,
                 bar, callback, tail=None, wrap=None) -> tuple[dict, nn.Module]:
    """One epoch; returns its metrics and the student (wrapped anew if the deploy tail began in it and put
    modules into the graph)."""
    t0 = time.perf_counter()
    qmodel = objective.q
    sampler.set_epoch(epoch)
    torch.manual_seed(_epoch_seed(config.seed, epoch, ctx.rank))
    gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, ctx.rank))
    objective.start_epoch(epoch)
    qmodel.train(True)
    task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=len(loader), info="")
    sums: dict = {}
    n = done = 0
    for step, (x, y) in enumerate(loader):
        if tail is not None and tail.due(epoch * len(loader) + step):
            tail.enter()
            if tail.changes_graph:
                student = wrap()
            log.info("deploy tail (%s form) from epoch %d, step %d: conv biases on the int32 grid", tail.form,
                     epoch + 1, step + 1)
        x = augment_batch(x.to(ctx.device, non_blocking=True), data.augment, gen)
        y = y.to(ctx.device, non_blocking=True)
        logits, aux = student(x)
        t_logits = None
        if teacher is not None and objective.uses_teacher:
            with torch.no_grad():
                t_logits = teacher(x)
        loss, parts = objective.loss(logits, aux, y, t_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        objective.after_backward()
        optimizer.step()
        objective.after_step()
        scheduler.step()
        n += 1
        for k, v in {"loss": loss.detach(), **parts}.items():  # summed where they live: no host sync per step
            sums[k] = sums[k] + v if k in sums else v
        if callback is None and (step + 1) % SYNC_EVERY and step + 1 != len(loader):
            continue
        lv, total = float(loss.detach()), float(sums["loss"])  # a NaN at any step so far poisons the sum
        if not (math.isfinite(lv) and math.isfinite(total)):
            raise FloatingPointError(f"the loss became {lv if not math.isfinite(lv) else total} by epoch "
                                     f"{epoch + 1}, step {step + 1}; lower the learning rate")
        bar.update(task, advance=step + 1 - done, info=f"loss {lv:.4f}")
        done = step + 1
        if callback:
            callback("step", {"epoch": epoch, "step": step, "loss": lv})
    bar.remove_task(task)
    qmodel.train(False)
    ddp.average_running_stats(qmodel, ctx)  # the ranks evaluate, save and fold one model
    extra = objective.end_epoch(epoch)
    row = {"epoch": epoch + 1, **{k: float(v) / max(1, n) for k, v in sums.items()},
           "lr": float(optimizer.param_groups[0]["lr"]), "val_acc": float(objective.evaluate(data.val)),
           "seconds": time.perf_counter() - t0}
    row.update(extra)
    log.info("epoch %d: %s", epoch + 1, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    return row, student


def _payload(epoch, qmodel, optimizer, scheduler, objective, config, metrics, signature, tail_form=False) -> dict:
    return {"deploy_tail": tail_form,
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "method": config.method.value,
            "config": config.to_dict(), "model": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()},
            "precision": signature, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "objective": objective.state_dict(), "rng": _rng_state(),
            "metrics": metrics}


# settings that say where and how a run executes, not what it trains: a checkpoint resumes across them
_WHERE_NOT_WHAT = ("resume", "checkpoint_dir", "ddp", "device", "eval_batch_size")


def _widths(entry) -> str:
    """A precision-signature entry as the user reads it: "off", "4", "4..8" or "none"."""
    if entry is None:
        return "none"
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list):
        on, bits = entry
        if not on:
            return "off"
        lo, hi = min(bits, default=0), max(bits, default=0)
        return str(lo) if lo == hi else f"{lo}..{hi}"
    return str(entry)


def _resume(path, qmodel, optimizer, scheduler, objective, config, signature,
            before_load: Callable[[str], bool] = lambda form: False) -> tuple[int, list[dict]] | None:
    """Load the checkpoint at ``path`` into the run; ``before_load(form)`` first puts the model into the deploy
    tail when the checkpoint was written in one of that form (False: this run has no such tail, start afresh)."""
    try:
        payload = load_checkpoint(path)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read the checkpoint {path} ({e}); delete it or run without resume") from None
    if payload["method"] != config.method.value:
        raise ValueError(f"the checkpoint {path} is for method {payload['method']!r}, not "
                         f"{config.method.value!r}; delete it or run without resume")
    if payload["precision"] != signature:
        old_sig = payload["precision"]
        diff = sorted(k for k in set(old_sig) | set(signature) if old_sig.get(k) != signature.get(k))
        shown = "; ".join(f"{k} {_widths(old_sig.get(k))} -> {_widths(signature.get(k))}" for k in diff[:3])
        raise ValueError(f"the checkpoint {path} was written for other quantizers ({shown}"
                         f"{f'; {len(diff) - 3} more' if len(diff) > 3 else ''}): another plan, or another "
                         "--profile / --residual-quant; delete it or run without resume")
    old, new = payload.get("config", {}), config.to_dict()
    changed = sorted(k for k, v in new.items() if k not in _WHERE_NOT_WHAT and old.get(k) != v)
    if changed:  # a resumed run must end where the uninterrupted one would: another recipe is another run
        log.warning("the checkpoint %s was written with %s: starting afresh", path,
                    ", ".join(f"{k} {old.get(k)!r}, not {new.get(k)!r}" for k in changed))
        return None
    form = payload.get("deploy_tail")
    if form and not before_load(form if isinstance(form, str) else "folded"):
        log.warning("the checkpoint %s was written inside a deploy tail (%s form) this run does not have: "
                    "starting afresh", path, form)
        return None
    device = next(iter(qmodel.parameters())).device
    load_model_state(qmodel, {k: v.to(device) for k, v in payload["model"].items()})
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    objective.load_state_dict(payload["objective"])
    _set_rng_state(payload["rng"])
    return int(payload["epoch"]), list(payload["metrics"])


__all__ = ["CHECKPOINT_NAME", "FinetuneResult", "Objective", "accuracy", "apply_plan", "assignment_from_plan",
           "checkpoint_path", "distill_loss", "finetune", "load_checkpoint", "load_model_state", "objective_for",
           "precision_signature", "prepare", "register_objective", "save_checkpoint", "task_loss"]
