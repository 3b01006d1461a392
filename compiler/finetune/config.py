"""``FinetuneConfig``: every knob of a fine-tuning run as one frozen, validated, TOML-round-tripped value.

Configs are data (style.md section 3.1): frozen dataclasses whose ``__post_init__`` raises ``ValueError`` on a
bad value, with a ``version`` and a round trip through a small TOML subset (scalars, arrays of numbers, and
one table per method: ``[distill]``, ``[pdqat]``, ``[energy]``, ``[dxmax]``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mpqc.compiler.options_file import toml_value

CONFIG_VERSION = 1


class Method(str, enum.Enum):
    """The fine-tuning method (seeds.md section in brackets)."""

    LSQ = "lsq"  # LSQ QAT: weights, biases and step sizes trained (3.1)
    PDQAT = "pdqat"  # primal-dual QAT with per-layer proximity and output constraints (5.2)
    ENERGY = "energy"  # Garg et al.: analog noise, learned log E per layer or noise-aware fine-tuning (2.3)
    DXMAX = "dxmax"  # Uhlich et al.: learned step d and range x_max, memory penalty (4.1, 4.3)


class Optimizer(str, enum.Enum):
    """The primal optimizer."""

    SGD = "sgd"  # momentum, Nesterov
    ADAM = "adam"
    ADAMW = "adamw"


class Scheduler(str, enum.Enum):
    """Learning-rate schedule, stepped once per batch."""

    COSINE = "cosine"
    CONSTANT = "constant"


class RangeInit(str, enum.Enum):
    """How quantizer ranges are initialised from calibration data before learning (mirrors quantize.RangeMethod)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class EnergyMode(str, enum.Enum):
    """Garg et al.'s learned allocation (weights frozen, log E trained) or noise-aware fine-tuning (E fixed)."""

    LEARN = "learn"
    FIXED = "fixed"


def _pos(name: str, v: Any, *, allow_zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, not {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {v!r}")


def _int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, not {v!r}")


def _range(name: str, v: Any) -> None:
    if not (isinstance(v, tuple) and len(v) == 2):
        raise ValueError(f"{name} must be a pair (low, high), not {v!r}")
    _pos(f"{name}[0]", v[0])
    _pos(f"{name}[1]", v[1])
    if v[0] > v[1]:
        raise ValueError(f"{name} must have low <= high, not {v!r}")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the float teacher: loss = (1 - weight) CE + weight T^2 KL(p_T || q_T)."""

    enabled: bool = True
    temperature: float = 2.0
    weight: float = 0.5

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"distill.enabled must be true or false, not {self.enabled!r}")
        _pos("distill.temperature", self.temperature)
        _pos("distill.weight", self.weight, allow_zero=True)
        if self.weight > 1:
            raise ValueError(f"distill.weight must lie in [0, 1], not {self.weight!r}")


@dataclass(frozen=True)
class PDQATConfig:
    """PD-QAT (Hounie et al., seeds.md 5.2): constraint levels, dual step and dual initialisation.

    ``eps_layer`` bounds each layer's proximity ||y_l^q - y_l^fp||^2 (mean over elements; relative to
    mean(y_l^fp^2) when ``normalize``), ``eps_out`` bounds KL(teacher || student) of the outputs. Duals move
    once per epoch: lambda <- max(0, lambda + dual_lr * mean slack), measured over ``dual_batches`` batches
    of the training split (None: all of it). The seed's defaults are dual_lr 0.01, lambda_out 1, lambda_l 0.
    """

    eps_layer: float = 0.01
    eps_out: float = 0.05
    dual_lr: float = 0.01
    lambda_out_init: float = 1.0
    lambda_layer_init: float = 0.0
    layerwise: bool = True
    normalize: bool = True
    dual_batches: int | None = None

    def __post_init__(self):
        _pos("pdqat.eps_layer", self.eps_layer, allow_zero=True)
        _pos("pdqat.eps_out", self.eps_out, allow_zero=True)
        _pos("pdqat.dual_lr", self.dual_lr, allow_zero=True)
        _pos("pdqat.lambda_out_init", self.lambda_out_init, allow_zero=True)
        _pos("pdqat.lambda_layer_init", self.lambda_layer_init, allow_zero=True)
        for k in ("layerwise", "normalize"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"pdqat.{k} must be true or false")
        if self.dual_batches is not None:
            _int("pdqat.dual_batches", self.dual_batches, 1)


@dataclass(frozen=True)
class EnergyConfig:
    """Garg et al.'s energy training (seeds.md 2.3) for an analog target with thermal noise.

    ``mode="learn"``: weights and step sizes frozen, log E per layer (per channel with ``per_channel``)
    trained with CE + penalty * max(0, log E_bar - log e_target), E_bar the MAC-weighted mean E; Adam at
    ``lr`` (the seed's 0.01) unless the run's optimizer is set otherwise. ``mode="fixed"``: noise-aware
    fine-tuning of the weights at a fixed E allocation (the plan's ``emac``, else ``e_init``). Its quantizer
    ranges stay at their calibrated values unless ``train_ranges``: the thermal sigma grows with the ranges
    (sigma ∝ R_w R_x), and the seed calibrates them with the noise off and then freezes them; LSQ step sizes
    trained under noise grow with it and feed it back (ResNet-20 at E = 8 diverged to 9 % in 23 steps at
    lr 0.002 with trained ranges).
    """

    mode: EnergyMode = EnergyMode.LEARN
    e_init: float = 1000.0
    e_target: float = 100.0
    penalty: float = 4.0
    per_channel: bool = False
    noise_seed: int = 0
    lr: float = 0.01
    e_min: float = 1e-3
    train_ranges: bool = False
    noise: str = "thermal"  # the target's [analog] noise model and constants (research/seeds.md 2.2)
    sigma_t: float = 0.01
    weight_noise: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "mode", EnergyMode(self.mode))
        if self.noise not in ("thermal", "shot", "weight"):
            raise ValueError(f"energy.noise must be thermal, shot or weight, not {self.noise!r}")
        for k in ("sigma_t", "weight_noise"):
            _pos(f"energy.{k}", getattr(self, k))
        if not isinstance(self.train_ranges, bool):
            raise ValueError("energy.train_ranges must be true or false")
        for k in ("e_init", "e_target", "lr", "e_min"):
            _pos(f"energy.{k}", getattr(self, k))
        _pos("energy.penalty", self.penalty, allow_zero=True)
        if not isinstance(self.per_channel, bool):
            raise ValueError("energy.per_channel must be true or false")
        _int("energy.noise_seed", self.noise_seed, 0)


@dataclass(frozen=True)
class DxmaxConfig:
    """Uhlich et al.'s (d, x_max) parametrisation and memory penalty (seeds.md 4.1-4.3).

    Loss = CE + penalty_w relu(S_w - weight_kb)^2 + penalty_a relu(S_a - act_kb)^2 with S in KB (1024 bytes);
    S_a is the largest (``act_mode="max"``) or the summed activation tensor. A ``None`` target is what the plan's
    widths occupy when training starts (``budget_from_plan``; off: the term is dropped, as in the seed code, and
    nothing holds the widths back). Ranges are the seed code's defaults; with a target, d and x_max gradients are
    clipped to [-d, d]. Learned widths stay within ``min_bits``..``max_bits`` (what the export and the runtimes
    take; the seed leaves them open above and its first layers reach 9-10 bits).
    """

    weight_kb: float | None = None
    act_kb: float | None = None
    budget_from_plan: bool = True
    min_bits: int = 2
    max_bits: int = 8
    act_mode: str = "max"
    penalty_w: float = 0.1
    penalty_a: float = 0.1
    d_range: tuple[float, float] = (2.0**-8, 1.0)
    xmax_range_w: tuple[float, float] = (2.0**-8, 127.0)
    xmax_range_a: tuple[float, float] = (2.0**-8, 255.0)
    clip_grads: bool = True

    def __post_init__(self):
        for k in ("weight_kb", "act_kb"):
            if getattr(self, k) is not None:
                _pos(f"dxmax.{k}", getattr(self, k))
        if self.act_mode not in ("max", "sum"):
            raise ValueError(f"dxmax.act_mode must be 'max' or 'sum', not {self.act_mode!r}")
        _pos("dxmax.penalty_w", self.penalty_w, allow_zero=True)
        _pos("dxmax.penalty_a", self.penalty_a, allow_zero=True)
        for k in ("d_range", "xmax_range_w", "xmax_range_a"):
            v = getattr(self, k)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, k, v)
            _range(f"dxmax.{k}", v)
        if not isinstance(self.clip_grads, bool):
            raise ValueError("dxmax.clip_grads must be true or false")
        if not isinstance(self.budget_from_plan, bool):
            raise ValueError("dxmax.budget_from_plan must be true or false")
        _int("dxmax.min_bits", self.min_bits, 2)  # the narrowest grid the export and the runtimes take
        _int("dxmax.max_bits", self.max_bits, 1)
        if self.max_bits < self.min_bits:
            raise ValueError(f"dxmax.max_bits ({self.max_bits}) must be >= dxmax.min_bits ({self.min_bits})")


_SECTIONS = {"distill": DistillConfig, "pdqat": PDQATConfig, "energy": EnergyConfig, "dxmax": DxmaxConfig}


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run.

    ``freeze_bn_last_epochs``: BatchNorm is folded into the preceding conv/linear when the model is
    captured (``capture(..., fold_bn=True)``), so the graph being trained has no BN layer and no batch
    statistics: they are frozen for every epoch, exactly as exported. What the classic recipe (freeze BN
    statistics and observers for the last epochs) leaves to freeze is the quantizers: during the last N
    epochs the step sizes (LSQ scales, or d and x_max) stop learning while the weights go on adapting to
    the final grid.

    ``quant_lr`` is the step-size learning rate (None: ``lr``). ``weight_decay`` applies to weights only.
    ``checkpoint_dir``: where ``last.pt`` is written after every epoch (None: no checkpoints); with
    ``resume`` an existing one is continued. ``ddp``: use torch.distributed when launched by torchrun
    (one process otherwise). ``device``: "auto" (CUDA when available), "cpu" or "cuda". ``batch_stats`` (LSQ, PD-QAT):
    normalise each folded conv's output with batch statistics while training, folded back at the end
    (:mod:`.renorm`): what training-mode BN gives a network that was captured with BN folded. ``deploy_tail``
    (LSQ): the last fraction of the steps trains with the conv biases the export writes, rounded onto the int32
    accumulator grid by straight-through (:mod:`.deploy_tail`); 0 (default) turns it off.
    """

    epochs: int = 5
    lr: float = 0.005
    quant_lr: float | None = None
    batch_size: int = 64
    optimizer: Optimizer = Optimizer.SGD
    momentum: float = 0.9
    weight_decay: float = 5e-5
    scheduler: Scheduler = Scheduler.COSINE
    method: Method = Method.LSQ
    range_init: RangeInit = RangeInit.MSE
    freeze_bn_last_epochs: int = 0
    batch_stats: bool = True
    deploy_tail: float = 0.0
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = True
    ddp: bool = False
    device: str = "auto"
    eval_batch_size: int = 256
    calib_batches: int = 8
    distill: DistillConfig = field(default_factory=DistillConfig)
    pdqat: PDQATConfig = field(default_factory=PDQATConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    dxmax: DxmaxConfig = field(default_factory=DxmaxConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version!r} is not {CONFIG_VERSION}")
        for k, enum_t in (("optimizer", Optimizer), ("scheduler", Scheduler), ("method", Method),
                          ("range_init", RangeInit)):
            try:
                object.__setattr__(self, k, enum_t(getattr(self, k)))
            except ValueError:
                choices = ", ".join(e.value for e in enum_t)
                raise ValueError(f"{k} must be one of {choices}, not {getattr(self, k)!r}") from None
        _int("epochs", self.epochs, 1)
        _pos("lr", self.lr)
        if self.quant_lr is not None:
            _pos("quant_lr", self.quant_lr, allow_zero=True)
        _int("batch_size", self.batch_size, 1)
        _int("eval_batch_size", self.eval_batch_size, 1)
        _int("calib_batches", self.calib_batches, 1)
        _pos("momentum", self.momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must lie in [0, 1), not {self.momentum!r}")
        _pos("weight_decay", self.weight_decay, allow_zero=True)
        _int("freeze_bn_last_epochs", self.freeze_bn_last_epochs, 0)
        if self.freeze_bn_last_epochs > self.epochs:
            raise ValueError(f"freeze_bn_last_epochs ({self.freeze_bn_last_epochs}) exceeds epochs ({self.epochs})")
        _pos("deploy_tail", self.deploy_tail, allow_zero=True)
        if self.deploy_tail >= 1:
            raise ValueError(f"deploy_tail must lie in [0, 1), not {self.deploy_tail!r}")
        _int("seed", self.seed, 0)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        for k in ("resume", "ddp", "batch_stats"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be true or false, not {getattr(self, k)!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for k, typ in _SECTIONS.items():
            v = getattr(self, k)
            if isinstance(v, dict):
                object.__setattr__(self, k, _section(typ, v, k))
            elif not isinstance(v, typ):
                raise ValueError(f"{k} must be a {typ.__name__}, not {type(v).__name__}")

    # -- conversions -------------------------------------------------------------------------------------
    def replace(self, **changes) -> FinetuneConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON/TOML-compatible data (enums as strings, tuples as lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """Build from plain data; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"a fine-tuning config is a table, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown config key {extra[0]!r} (known: {', '.join(sorted(known))})")
        kw = dict(d)
        for k, typ in _SECTIONS.items():
            if k in kw:
                kw[k] = _section(typ, kw[k], k)
        return cls(**kw)

    def to_toml(self) -> str:
        """The config as TOML: top-level scalars, then one table per section (None values are omitted)."""
        d = self.to_dict()
        lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if k not in _SECTIONS and v is not None]
        for k in _SECTIONS:
            lines.append("")
            lines.append(f"[{k}]")
            lines += [f"{kk} = {toml_value(vv)}" for kk, vv in d[k].items() if vv is not None]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> FinetuneConfig:
        """Parse TOML text; syntax errors and bad values raise ``ValueError``."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"not valid TOML ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FinetuneConfig:
        """Read a TOML config file (``OSError`` if unreadable, ``ValueError`` if malformed)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_toml(f.read())

    def save(self, path: str | os.PathLike) -> None:
        """Write the TOML atomically (temp file + ``os.replace``)."""
        from mpqc.atomic import atomic_write_text

        atomic_write_text(os.fspath(path), self.to_toml())


def _section(typ, v, name: str):
    if isinstance(v, typ):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"[{name}] must be a table, not {type(v).__name__}")
    known = {f.name for f in dataclasses.fields(typ)}
    extra = sorted(set(v) - known)
    if extra:
        raise ValueError(f"unknown key {extra[0]!r} in [{name}] (known: {', '.join(sorted(known))})")
    kw = {k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()}
    return typ(**kw)


def _plain(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


__all__ = ["CONFIG_VERSION", "DistillConfig", "DxmaxConfig", "EnergyConfig", "EnergyMode", "FinetuneConfig",
           "Method", "Optimizer", "PDQATConfig", "RangeInit", "Scheduler"]
