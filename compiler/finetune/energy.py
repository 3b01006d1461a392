"""Analog noise on layer outputs and Garg et al.'s energy training (seeds.md 2.2-2.3).

:class:`NoiseInjector` inserts one :class:`LayerNoise` module after the fx node of every conv/linear layer of
a :class:`~mpqc.compiler.quantize.QuantizedModel` (``call_module`` nodes in ``qmodel.gm``, the way
``quantize.py`` inserts quantizers). Each adds thermal noise with ``mpqc.kernels.analog_noise_log_e``:

    y + sigma * n,   sigma = sigma_t sqrt(N) R_w R_x / sqrt(E)   (``mpqc.kernels.thermal_sigma``)

with N the layer's fan-in (``op.fan_in``: C_in/groups k_h k_w; the seed code does not divide by groups),
R_w = s_w (2^b_w - 1) the full range of the quantized weights per output channel and R_x = s_a (2^b_a - 1)
that of the quantized input (a float operand falls back to its observed range), and E the energy per MAC
held as a parameter log E (per layer, or per output channel). Noise is drawn from Philox keyed by
(seed, counter), so a run, or an evaluation under :meth:`NoiseInjector.fixed_noise`, reproduces it.

:class:`EnergyObjective` (``method="energy"``): ``mode="learn"`` is Garg et al.'s allocation: every weight and
step size frozen, log E trained (Adam) on CE + penalty * max(0, log E_bar - log E*) with
E_bar = sum_l mean(E_l) MACs_l / sum_l MACs_l. ``mode="fixed"`` is noise-aware fine-tuning: the weights train
with noise injected at a fixed allocation, the quantizer ranges frozen at calibration (``train_ranges``: LSQ).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterator

import torch
from torch import nn

from mpqc.compiler.ir import OpKind
from mpqc.compiler.quantize import QuantizedModel
from mpqc.kernels import analog_noise_log_e, thermal_sigma

from .config import EnergyMode, Method
from .driver import Objective, accuracy, register_objective, task_loss
from .graph_taps import Splices

EmacSpec = float | dict[str, float | list[float]]
_SEED_MOD = 2**62


class LayerNoise(nn.Module):
    """Thermal noise on one layer's output: std ``sigma_fn() * exp(-log_e / 2)`` along channel ``axis``."""

    def __init__(self, layer: str, sigma_fn: Callable[[], torch.Tensor], log_e: torch.Tensor, *, axis: int,
                 channels: int, macs: int, seed: int):
        super().__init__()
        self.layer = layer
        self.channels = int(channels)
        self.sigma_fn = sigma_fn
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

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.enabled:
            return y
        # sigma at E = 1 depends on the quantizers' ranges; it scales the noise but is not a training signal
        s1 = self.sigma_fn().detach().to(device=y.device, dtype=torch.float32)
        seed = (int(self.seed) + 1_000_033 * self.stream) % _SEED_MOD
        out = analog_noise_log_e(y, s1, self.log_e, seed=seed, offset=int(self.counter), axis=self.axis,
                                 backend="fast")
        with torch.no_grad():
            self.counter += y.numel()
        return out


def _thermal_sigma_fn(qmodel: QuantizedModel, op) -> Callable[[], torch.Tensor]:
    wq = qmodel.weight_quantizer(op.name)
    aqs = qmodel.act_quantizers(op.name)
    aq = aqs[0] if aqs else None
    weight = qmodel.weight(op.name)
    channels = weight.shape[0]
    if aq is not None and not aq.enabled and float(aq.absmax) <= 0:
        raise ValueError(f"layer {op.name}: its input is float and was never calibrated, so the thermal-noise "
                         "range R_x is unknown; calibrate the QuantizedModel first")

    def sigma() -> torch.Tensor:
        if wq is not None and wq.enabled:
            r_w = wq.scale.abs() * (torch.exp2(wq.bits.float()) - 1)
        else:
            w = weight.detach().reshape(channels, -1)
            r_w = w.amax(1) - w.amin(1)
        if aq is not None and aq.enabled:
            r_x = aq.scale.abs() * float(2**aq.bits - 1)
        elif aq is not None:
            r_x = aq.absmax * (2.0 if aq.signed else 1.0)
        else:
            r_x = torch.ones(())
        return thermal_sigma(op.fan_in, r_w.float(), r_x.to(r_w.device).float(), 1.0)

    return sigma


def _safe_key(name: str, taken) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "layer"
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


class NoiseInjector:
    """Attach analog thermal noise to the conv/linear outputs of a QuantizedModel, at a per-layer E.

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
    """

    def __init__(self, qmodel: QuantizedModel, emac: EmacSpec = 1000.0, *, default: float = 1000.0,
                 layers: list[str] | None = None, per_channel: bool = False, seed: int = 0,
                 trainable: bool = False):
        gm = qmodel.gm
        if hasattr(gm, "noise"):
            raise ValueError("a NoiseInjector is already attached to this model; remove() it first")
        self.q = qmodel
        wanted = None if layers is None else set(layers)
        ops = [op for op in qmodel.graph_ir.layers() if op.kind in (OpKind.CONV, OpKind.LINEAR) and op.weight_fqn
               and (wanted is None or op.name in wanted)]
        if wanted is not None and wanted - {op.name for op in ops}:
            raise KeyError(f"no conv/linear layer named {sorted(wanted - {op.name for op in ops})[0]!r}")
        self._splices = Splices(gm, "noise")
        self.modules: dict[str, LayerNoise] = self._splices.modules  # type: ignore[assignment]
        nodes = {n.name: n for n in gm.graph.nodes}
        for idx, op in enumerate(ops):
            node = nodes[op.attrs["node"]]
            c = op.out_channels
            log_e = _initial_log_e(emac, op.name, default, c, per_channel)
            mod = LayerNoise(op.name, _thermal_sigma_fn(qmodel, op), log_e, axis=1 if op.kind == OpKind.CONV else -1,
                             channels=c, macs=op.macs, seed=_layer_seed(seed, idx))
            mod.to(qmodel.weight(op.name).device)
            mod.log_e.requires_grad_(trainable)
            self._splices.add(op.name, _safe_key(op.name, self._splices.dict), mod, node)
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
                       batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of ``qmodel`` on ``ds`` with thermal noise at ``emac`` (fixed noise seed)."""
    device = next(iter(qmodel.parameters())).device
    with NoiseInjector(qmodel, emac, default=default) as inj, inj.fixed_noise(seed):
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
                                      seed=ecfg.noise_seed, trainable=self.learn, layers=layers)
        for m in self.injector.modules.values():
            m.stream = self.ctx.rank

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
                   "e_bar": float(self.injector.average_energy().detach())}
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


__all__ = ["EnergyObjective", "LayerNoise", "NoiseInjector", "evaluate_at_energy"]
