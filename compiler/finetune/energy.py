"""Analog noise on layer outputs and Garg et al.'s energy training (seeds.md 2.2-2.3).

:class:`NoiseInjector` inserts one :class:`LayerNoise` module after the fx node of every conv/linear layer of
a :class:`~mpqc.compiler.quantize.QuantizedModel` (``call_module`` nodes in ``qmodel.gm``, the way
``quantize.py`` inserts quantizers). Each draws the noise of one of Garg et al.'s models (an
:class:`AnalogNoiseModel`: a target's ``[analog] noise``, ``sigma_t`` and ``weight_noise``) as the search priced
it (``mpqc.cost_models.analog.output_noise_variance`` on the same quantizer ranges), E the energy per MAC:

    thermal: y + sigma n,   sigma = sigma_t sqrt(N) R_w R_x / sqrt(E)        per output channel
    shot:    y + sigma n,   sigma = ||w_j|| ||x_patch|| / (sqrt(N) sqrt(E))  per output element
    weight:  y + GEMM(x, dW), dW = sigma_w n,  sigma_w = weight_noise R_w / sqrt(E)  per weight element

with N the layer's fan-in (``op.fan_in``: C_in/groups k_h k_w; the seed code does not divide by groups),
R_w = s_w (2^b_w - 1) the full range of the quantized weights per output channel and R_x = s_a (2^b_a - 1)
that of the quantized input (a float operand falls back to its observed range), ||w_j|| the L2 norm of the
weight row the GEMM reads, ||x_patch|| that of the input each output reads (its receptive field), and E held
as a parameter log E (per layer, or per output channel). Weight noise is one draw of dW per forward pass (the
array's weights), so its variance on an output is sigma_w^2 ||x_patch||^2, the cost model's. Noise is drawn
with ``mpqc.kernels.analog_noise_log_e``, keyed by (seed, counter), so a run, or an evaluation under
:meth:`NoiseInjector.fixed_noise`, reproduces it. Shot and weight noise read the layer's input and weight
(the spliced node gets them as extra arguments): they cover 2-d convolutions and linear layers.

:class:`EnergyObjective` (``method="energy"``): ``mode="learn"`` is Garg et al.'s allocation: every weight and
step size frozen, log E trained (Adam) on CE + penalty * max(0, log E_bar - log E*) with
E_bar = sum_l mean(E_l) MACs_l / sum_l MACs_l. ``mode="fixed"`` is noise-aware fine-tuning: the weights train
with noise injected at a fixed allocation, the quantizer ranges frozen at calibration (``train_ranges``: LSQ).
Its noise model is read from the energy config's ``noise``, ``sigma_t`` and ``weight_noise`` where it has
them (:meth:`AnalogNoiseModel.of`), the thermal model with the seed's constants otherwise.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mpqc.compiler.ir import OpKind
from mpqc.compiler.quantize import QuantizedModel
from mpqc.cost_models.analog import SIGMA_T, WEIGHT_NOISE
from mpqc.kernels import analog_noise_log_e, shot_sigma, thermal_sigma, weight_sigma

from .config import EnergyMode, Method
from .driver import Objective, accuracy, register_objective, task_loss
from .graph_taps import Splices

EmacSpec = float | dict[str, float | list[float]]
_SEED_MOD = 2**62


NOISE_KINDS = ("thermal", "shot", "weight")


@dataclass(frozen=True)
class AnalogNoiseModel:
    """One of Garg et al.'s noise models with its constants (seeds.md 2.2; a target's ``[analog]`` table).

    ``kind``: ``"thermal"`` (std sigma_t sqrt(N) R_w R_x / sqrt(E) on every output), ``"shot"``
    (||w_j|| ||x_patch|| / sqrt(N E) on every output) or ``"weight"`` (weight_noise R_w / sqrt(E) on every
    weight). The constants default to the seed code's, as a target's do (``mpqc.cost_models.analog``).
    """

    kind: str = "thermal"
    sigma_t: float = SIGMA_T
    weight_noise: float = WEIGHT_NOISE

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown analog noise model {self.kind!r}: use one of {', '.join(NOISE_KINDS)}")
        for k in ("sigma_t", "weight_noise"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"analog noise {k} must be a positive finite number, got {v!r}")
            object.__setattr__(self, k, float(v))

    @classmethod
    def of(cls, spec: Any = None) -> AnalogNoiseModel:
        """The model ``spec`` describes: a target (its ``analog`` table), an ``AnalogSpec``, an AnalogNoiseModel,
        or any object with ``noise`` / ``sigma_t`` / ``weight_noise`` attributes (an energy config; those it
        lacks take the defaults). ``None``: the defaults (thermal, sigma_t = 0.01)."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        spec = getattr(spec, "analog", None) or spec
        return cls(kind=getattr(spec, "noise", "thermal"), sigma_t=getattr(spec, "sigma_t", SIGMA_T),
                   weight_noise=getattr(spec, "weight_noise", WEIGHT_NOISE))

    def as_dict(self) -> dict:
        """``{"noise", "sigma_t", "weight_noise"}``, a target's ``[analog]`` keys."""
        return {"noise": self.kind, "sigma_t": self.sigma_t, "weight_noise": self.weight_noise}


class LayerNoise(nn.Module):
    """Analog noise on one layer's output at energy per MAC ``exp(log_e)`` (per layer or along channel ``axis``).

    ``kind`` thermal: ``sigma_fn()`` is the std at E = 1 per output channel; shot: ``sigma_fn(x, w)`` the std at
    E = 1 of every output element, from the layer's input ``x`` and weight ``w``; weight: ``sigma_fn()`` the
    std at E = 1 of every weight of an output channel, and ``gemm(x, dW)`` the layer's product with the weight
    noise dW, added to the output. Shot and weight noise take ``forward(y, x, w)``.
    """

    def __init__(self, layer: str, sigma_fn: Callable[..., torch.Tensor], log_e: torch.Tensor, *, axis: int,
                 channels: int, macs: int, seed: int, kind: str = "thermal",
                 gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown analog noise model {kind!r}: use one of {', '.join(NOISE_KINDS)}")
        if kind == "weight" and gemm is None:
            raise ValueError("weight noise needs the layer's product (gemm) to apply the noisy weights")
        self.layer = layer
        self.kind = kind
        self.channels = int(channels)
        self.sigma_fn = sigma_fn
        self.gemm = gemm
        self.axis = axis
        self.macs = int(macs)
        self.enabled = True
        self.stream = 0  # added to the seed: data-parallel ranks draw different noise from equal buffers
        self.log_e = nn.Parameter(log_e.detach().clone().float(), requires_grad=False)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    @property
    def energy(self) -> torch.Tensor:
        """E = exp(log E) (scalar or per channel)."""
        return self.log_e.exp()

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None,  # noqa: D102
                w: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return y
        if self.kind != "thermal" and (x is None or w is None):
            raise ValueError(f"layer {self.layer}: {self.kind} noise needs the layer's input and weight")
        seed = (int(self.seed) + 1_000_033 * self.stream) % _SEED_MOD
        offset = int(self.counter)
        # sigma at E = 1 depends on the quantizers' ranges (and the operands): it scales the noise but is not
        # a training signal
        if self.kind == "weight":  # one draw of dW per pass: the array's weights, shared by the whole batch
            s1 = self.sigma_fn().detach().to(device=w.device, dtype=torch.float32)
            zeros = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
            dw = analog_noise_log_e(zeros, s1, self.log_e, seed=seed, offset=offset, axis=0, backend="fast")
            out = y + self.gemm(x, dw.to(x.dtype)).to(y.dtype)
            drawn = w.numel()
        else:
            s1 = self.sigma_fn(x, w) if self.kind == "shot" else self.sigma_fn()
            s1 = s1.detach().to(device=y.device, dtype=torch.float32)
            out = analog_noise_log_e(y, s1, self.log_e, seed=seed, offset=offset, axis=self.axis, backend="fast")
            drawn = y.numel()
        with torch.no_grad():
            self.counter += drawn
        return out


def _weight_range_fn(qmodel: QuantizedModel, op) -> Callable[[], torch.Tensor]:
    """R_w per output channel: s_w (2^b_w - 1) of the weight quantizer, the observed range of a float weight."""
    wq = qmodel.weight_quantizer(op.name)
    weight = qmodel.weight(op.name)
    channels = weight.shape[0]

    def r_w() -> torch.Tensor:
        if wq is not None and wq.enabled:
            return (wq.scale.abs() * (torch.exp2(wq.bits.float()) - 1)).float()
        w = weight.detach().reshape(channels, -1)
        return (w.amax(1) - w.amin(1)).float()

    return r_w


def _thermal_sigma_fn(qmodel: QuantizedModel, op, sigma_t: float = SIGMA_T) -> Callable[[], torch.Tensor]:
    r_w_fn = _weight_range_fn(qmodel, op)
    aqs = qmodel.act_quantizers(op.name)
    aq = aqs[0] if aqs else None
    if aq is not None and not aq.enabled and float(aq.absmax) <= 0:
        raise ValueError(f"layer {op.name}: its input is float and was never calibrated, so the thermal-noise "
                         "range R_x is unknown; calibrate the QuantizedModel first")

    def sigma() -> torch.Tensor:
        r_w = r_w_fn()
        if aq is not None and aq.enabled:
            r_x = aq.scale.abs() * float(2**aq.bits - 1)
        elif aq is not None:
            r_x = aq.absmax * (2.0 if aq.signed else 1.0)
        else:
            r_x = torch.ones(())
        return thermal_sigma(op.fan_in, r_w, r_x.to(r_w.device).float(), 1.0, sigma_t)

    return sigma


def _weight_sigma_fn(qmodel: QuantizedModel, op, scale: float = WEIGHT_NOISE) -> Callable[[], torch.Tensor]:
    r_w_fn = _weight_range_fn(qmodel, op)
    return lambda: weight_sigma(r_w_fn(), 1.0, scale).float()


class _Gemm:
    """The product a conv2d or linear layer computes (no bias), redone on the weight noise, and the energy
    ||x_patch||^2 of the input each of its outputs reads (shot noise)."""

    def __init__(self, op):
        self.conv = op.kind == OpKind.CONV
        self.fan_in = int(op.fan_in)
        if self.conv:
            a = op.attrs
            self.stride, self.padding = a.get("stride", 1), a.get("padding", 0)
            self.dilation, self.groups = a.get("dilation", 1), int(op.groups or 1)
            c_out, c_in_g, kh, kw = op.weight_shape
            self.c_out, self.kernel = int(c_out), (int(c_in_g), int(kh), int(kw))

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w)

    def patch_sq(self, x: torch.Tensor) -> torch.Tensor:
        """||x_patch||^2 of every output (sample, channel, position), broadcastable to the layer's output."""
        if not self.conv:
            return x.pow(2).sum(-1, keepdim=True)
        ones = x.new_ones(self.groups, *self.kernel)
        p = F.conv2d(x.pow(2), ones, None, self.stride, self.padding, self.dilation, self.groups)  # (B, g, H, W)
        return p if self.groups == 1 else p.repeat_interleave(self.c_out // self.groups, dim=1)

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast against the output."""
        return v.reshape(1, -1, 1, 1) if self.conv else v


def _shot_sigma_fn(gemm: _Gemm) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def sigma(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, w = x.detach().float(), w.detach().float()
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        return shot_sigma(gemm.channel_view(w_norm), gemm.patch_sq(x).sqrt(), gemm.fan_in, 1.0)

    return sigma


_GEMM_TARGETS = {OpKind.CONV: ("conv2d", "convolution", "_convolution"), OpKind.LINEAR: ("linear",)}


def _operands(op, node: torch.fx.Node, kind: str) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The input and weight nodes of a conv2d / linear layer's fx node (what shot and weight noise read)."""
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    dims = {OpKind.CONV: 4, OpKind.LINEAR: 2}.get(op.kind)
    if node.op != "call_function" or name not in _GEMM_TARGETS.get(op.kind, ()) or len(node.args) < 2 \
            or len(op.weight_shape or []) != dims or not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
        raise ValueError(f"layer {op.name}: {kind} noise is injected into 2-d convolutions and linear layers "
                         f"(conv2d, linear), not {node.target}; keep this layer digital (--emac map or "
                         "NoiseInjector layers=) or use the thermal noise model")
    return node.args[0], node.args[1]


def _layer_noise(qmodel: QuantizedModel, op, node: torch.fx.Node, model: AnalogNoiseModel, log_e: torch.Tensor,
                 seed: int) -> tuple[LayerNoise, tuple]:
    """The noise module of one layer under ``model`` and the extra fx arguments (input, weight) it reads."""
    extra: tuple = ()
    gemm = None
    if model.kind == "thermal":
        sigma_fn = _thermal_sigma_fn(qmodel, op, model.sigma_t)
    else:
        extra = _operands(op, node, model.kind)
        gemm = _Gemm(op)
        sigma_fn = _shot_sigma_fn(gemm) if model.kind == "shot" else _weight_sigma_fn(qmodel, op, model.weight_noise)
    mod = LayerNoise(op.name, sigma_fn, log_e, axis=1 if op.kind == OpKind.CONV else -1, channels=op.out_channels,
                     macs=op.macs, seed=seed, kind=model.kind, gemm=gemm)
    return mod, extra


def _safe_key(name: str, taken) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "layer"
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


class NoiseInjector:
    """Attach analog noise (thermal, shot or weight) to the conv/linear layers of a QuantizedModel, at a per-layer E.

    Use as a context manager, or call :meth:`remove` to restore the graph::

        with NoiseInjector(qmodel, {"conv1": 50.0, "fc": 200.0}, default=100.0) as inj, inj.fixed_noise(0):
            acc = accuracy(qmodel, data.val)

    Args:
        qmodel: the model; its graph gains ``noise.<layer>`` call_module nodes after each layer's fx node.
        emac: energy per MAC, one float for every layer or ``{layer: float | [per channel]}``.
        default: E of layers missing from an ``emac`` dict.
        layers: restrict to these layer names (default: every conv/linear layer with a weight).
        per_channel: one log E per output channel for every layer (a per-channel list in ``emac`` makes
            that layer per channel regardless).
        seed: Philox key base; each layer gets its own stream.
        trainable: log E requires grad (energy training).
        noise: the noise model: an :class:`AnalogNoiseModel`, a target or its ``analog`` table (its ``noise``,
            ``sigma_t`` and ``weight_noise``), or None for thermal noise with sigma_t = 0.01.
    """

    def __init__(self, qmodel: QuantizedModel, emac: EmacSpec = 1000.0, *, default: float = 1000.0,
                 layers: list[str] | None = None, per_channel: bool = False, seed: int = 0,
                 trainable: bool = False, noise: Any = None):
        gm = qmodel.gm
        if hasattr(gm, "noise"):
            raise ValueError("a NoiseInjector is already attached to this model; remove() it first")
        self.q = qmodel
        self.noise = AnalogNoiseModel.of(noise)
        wanted = None if layers is None else set(layers)
        ops = [op for op in qmodel.graph_ir.layers() if op.kind in (OpKind.CONV, OpKind.LINEAR) and op.weight_fqn
               and not op.attrs.get("transposed") and (wanted is None or op.name in wanted)]
        if wanted is not None and wanted - {op.name for op in ops}:
            raise KeyError(f"no conv/linear layer named {sorted(wanted - {op.name for op in ops})[0]!r}")
        nodes = {n.name: n for n in gm.graph.nodes}
        built = []  # every module first: a layer the model cannot cover leaves the graph untouched
        for idx, op in enumerate(ops):
            node = nodes[op.attrs["node"]]
            log_e = _initial_log_e(emac, op.name, default, op.out_channels, per_channel)
            mod, extra = _layer_noise(qmodel, op, node, self.noise, log_e, _layer_seed(seed, idx))
            mod.to(qmodel.weight(op.name).device)
            mod.log_e.requires_grad_(trainable)
            built.append((op, node, mod, extra))
        self._splices = Splices(gm, "noise")
        self.modules: dict[str, LayerNoise] = self._splices.modules  # type: ignore[assignment]
        for op, node, mod, extra in built:
            self._splices.add(op.name, _safe_key(op.name, self._splices.dict), mod, node)
            if extra:  # shot and weight noise also read the layer's input and weight
                self._splices.nodes[op.name].args = (node, *extra)
        self._splices.commit()

    # -- energies --------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The log E parameters, one per layer (scalar or per channel)."""
        return [m.log_e for m in self.modules.values()]

    def energies(self) -> dict[str, float | list[float]]:
        """Current E per layer (a list per channel where log E is per channel)."""
        out: dict[str, float | list[float]] = {}
        for name, m in self.modules.items():
            e = m.energy.detach().cpu()
            out[name] = float(e) if e.dim() == 0 else [float(v) for v in e]
        return out

    @torch.no_grad()
    def set_energy(self, emac: EmacSpec, default: float | None = None) -> None:
        """Set E per layer (a float for all, or a dict; layers missing from a dict keep theirs unless ``default``).

        A value whose shape differs (per channel vs per layer) replaces the parameter object: do it between
        runs, not while an optimizer holds the old one.
        """
        for name, m in self.modules.items():
            if isinstance(emac, dict) and name not in emac and default is None:
                continue
            new = _initial_log_e(emac, name, default if default is not None else 1.0, m.channels, m.log_e.dim() > 0)
            if new.shape != m.log_e.shape:
                m.log_e = nn.Parameter(new.to(m.log_e.device), requires_grad=m.log_e.requires_grad)
            else:
                m.log_e.copy_(new.reshape(m.log_e.shape))

    def average_energy(self) -> torch.Tensor:
        """E_bar = sum_l mean(E_l) MACs_l / sum_l MACs_l, differentiable in log E."""
        mods = list(self.modules.values())
        total = sum(m.macs for m in mods)
        if not mods or total == 0:
            raise ValueError("no noisy layer with MACs: nothing to average")
        return sum(m.energy.mean() * m.macs for m in mods) / total

    # -- noise control ---------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return all(m.enabled for m in self.modules.values())

    @enabled.setter
    def enabled(self, on: bool) -> None:
        for m in self.modules.values():
            m.enabled = bool(on)

    @torch.no_grad()
    def reseed(self, seed: int) -> None:
        """Restart every layer's noise stream from ``seed``."""
        for idx, m in enumerate(self.modules.values()):
            m.seed.fill_(_layer_seed(seed, idx))
            m.counter.zero_()

    @contextlib.contextmanager
    def fixed_noise(self, seed: int = 0) -> Iterator[NoiseInjector]:
        """Draw the noise of a fresh ``seed`` inside the block (reproducible evaluations), then continue as before."""
        saved = [(m.seed.clone(), m.counter.clone(), m.stream) for m in self.modules.values()]
        self.reseed(seed)
        for m in self.modules.values():
            m.stream = 0  # the same noise on every rank
        try:
            yield self
        finally:
            with torch.no_grad():
                for m, (s, c, stream) in zip(self.modules.values(), saved):
                    m.seed.copy_(s)
                    m.counter.copy_(c)
                    m.stream = stream

    # -- detaching -------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the noise nodes out of the graph and drop the ``noise`` submodule (idempotent)."""
        self._splices.remove()

    def __enter__(self) -> NoiseInjector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _layer_seed(seed: int, idx: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (idx + 1)) % _SEED_MOD


def _initial_log_e(emac: EmacSpec, name: str, default: float, channels: int, per_channel: bool) -> torch.Tensor:
    e = emac.get(name, default) if isinstance(emac, dict) else emac
    if isinstance(e, (list, tuple)):
        if len(e) != channels:
            raise ValueError(f"layer {name}: {len(e)} per-channel energies for {channels} output channels")
        t = torch.tensor([float(v) for v in e])
    else:
        t = torch.full((channels,), float(e)) if per_channel else torch.tensor(float(e))
    if not bool(torch.all(t > 0)) or not bool(torch.all(torch.isfinite(t))):
        raise ValueError(f"layer {name}: energies per MAC must be positive and finite, got {e!r}")
    return t.log()


def evaluate_at_energy(qmodel: QuantizedModel, ds, emac: EmacSpec, *, default: float = 1000.0, seed: int = 0,
                       batch_size: int = 256, noise: Any = None, layers: list[str] | None = None) -> float:
    """Top-1 accuracy (%) of ``qmodel`` on ``ds`` with analog noise at ``emac`` (fixed noise seed).

    ``noise``: the noise model (a target, its ``analog`` table or an :class:`AnalogNoiseModel`; None: thermal
    with sigma_t = 0.01); ``layers``: the noisy layers (default every conv/linear layer, those missing from an
    ``emac`` dict at ``default``).
    """
    device = next(iter(qmodel.parameters())).device
    with NoiseInjector(qmodel, emac, default=default, noise=noise, layers=layers) as inj, inj.fixed_noise(seed):
        was = qmodel.training
        qmodel.train(False)
        try:
            return accuracy(qmodel, ds, batch_size=batch_size, device=device)
        finally:
            qmodel.train(was)


@register_objective(Method.ENERGY)
class EnergyObjective(Objective):
    """Garg et al.'s energy allocation (``learn``) or noise-aware fine-tuning at a fixed allocation (``fixed``)."""

    EVAL_SEED = 12345

    @property
    def learn(self) -> bool:
        return self.config.energy.mode == EnergyMode.LEARN

    def setup(self) -> None:  # noqa: D102
        super().setup()
        ecfg = self.config.energy
        if self.learn:  # "without retraining network weights": only log E learns
            for p in self.q.parameters():
                p.requires_grad_(False)
        elif not ecfg.train_ranges:  # calibrated ranges, frozen (sigma depends on them; see EnergyConfig)
            for p in self.quant_params():
                p.requires_grad_(False)
        # an emac map (the plan's) names the analog layers: the others (digital on the target) get no noise
        layers = list(self.emac) if self.emac else None
        self.injector = NoiseInjector(self.q, dict(self.emac or {}), default=ecfg.e_init, per_channel=ecfg.per_channel,
                                      seed=ecfg.noise_seed, trainable=self.learn, layers=layers,
                                      noise=self.noise_model())
        for m in self.injector.modules.values():
            m.stream = self.ctx.rank

    def noise_model(self) -> AnalogNoiseModel:
        """The target's noise model, as the energy config carries it (``noise``, ``sigma_t``, ``weight_noise``;
        thermal with sigma_t = 0.01 where it has none)."""
        return AnalogNoiseModel.of(self.config.energy)

    def param_groups(self):  # noqa: D102
        if not self.learn:
            groups = super().param_groups()
            if self.config.energy.train_ranges:
                return groups
            return [g for g in groups if g["name"] != "quant"]
        return [{"params": self.injector.parameters(), "lr": self.config.energy.lr, "weight_decay": 0.0,
                 "name": "log_e"}]

    def build_optimizer(self, groups):  # noqa: D102
        if self.learn:  # the seed trains log E with Adam (lr 0.01)
            return torch.optim.Adam(groups, lr=self.config.energy.lr)
        return super().build_optimizer(groups)

    def energy_penalty(self) -> torch.Tensor:
        """penalty * max(0, log E_bar - log E*)."""
        ecfg = self.config.energy
        return ecfg.penalty * torch.relu(self.injector.average_energy().log() - math.log(ecfg.e_target))

    def loss(self, logits, aux, y, teacher_logits):  # noqa: D102
        base, parts = task_loss(logits, y, teacher_logits, self.config.distill)
        if not self.learn:
            return base, parts
        pen = self.energy_penalty()
        parts["energy_penalty"] = pen.detach()
        return base + pen, parts

    def after_step(self):  # noqa: D102
        if self.learn:
            floor = math.log(self.config.energy.e_min)
            with torch.no_grad():
                for p in self.injector.parameters():
                    p.clamp_(min=floor)

    def end_epoch(self, epoch):  # noqa: D102
        return {"e_bar": float(self.injector.average_energy().detach())}

    def evaluate(self, ds):  # noqa: D102
        with self.injector.fixed_noise(self.EVAL_SEED):
            return super().evaluate(ds)

    def finish(self):  # noqa: D102
        summary = {"mode": self.config.energy.mode.value, "emac": self.injector.energies(),
                   "e_bar": float(self.injector.average_energy().detach()), "noise": self.injector.noise.as_dict()}
        was = self.q.training
        self.q.train(False)
        summary["final_accuracy"] = self.evaluate(self.data.val)
        self.q.train(was)
        self.injector.remove()
        summary.update(super().finish())
        return summary

    def abort(self):  # noqa: D102
        injector = getattr(self, "injector", None)
        if injector is not None:
            injector.remove()
        super().finish()


__all__ = ["AnalogNoiseModel", "EnergyObjective", "LayerNoise", "NoiseInjector", "evaluate_at_energy"]
