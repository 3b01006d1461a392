"""Uhlich et al.'s learned (d, x_max) parametrisation with the memory penalty (seeds.md 4.1-4.3).

For the run, every enabled weight and activation quantizer of the QuantizedModel is swapped for a
:class:`DxmaxQuantizer` (per tensor, as in the seed code): a learned step d, snapped to a power of two, and a
learned range x_max, through ``mpqc.kernels.fake_quant_dxmax`` (U3 gradients: bounded, independent of the
bit-width). The bit-width is inferred, b = ceil(log2(x_max/d + 1) + 1) for weights (signed) and
ceil(log2(x_max/d + 1)) for unsigned activations, and the loss adds the seed's penalty

    CE + penalty_w relu(S_w - S_w*)^2 + penalty_a relu(S_a - S_a*)^2,   S in KB = bits * elements / 8 / 1024

where S_w sums the quantized weight tensors (biases are not quantized here, unlike the seed) and S_a is the
largest (or the summed) quantized activation tensor per sample; a target not given is what the plan's widths
occupy at the start (without one the step sizes shrink freely and the widths climb: W4 became W8 in 5 steps).
Its gradient reaches d and x_max through the inferred bits with straight-through ceil and round. With a target
set, d and x_max gradients are clipped to [-d, d]; after each step both are projected back into their ranges
with d <= x_max and x_max / d within ``max_bits``.

At the end the learned quantizers are baked back into the LSQ quantizers QuantizedModel uses elsewhere: scale
d, bits as inferred, and weights clipped to [-x_max, x_max], so the weight codes equal the U3 ones exactly.
Activations then clip at the top of the b-bit grid rather than at x_max (at most 2^b - 1 - x_max/d steps
higher).

Initialisation (seeds.md 4.2): weights at the plan's bits b (the mean of a per-channel list),
d = 2^ceil(log2(max|w| / (2^(b-1) - 1))) (floor when b <= 4), x_max = d (2^(b-1) - 1); activations from the
calibrated step (d = its power of two, x_max = d (2^b - 1)) rather than the seed's fixed d = 2^-3.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpqc.compiler.quantize import ActQuantizer, QuantizedModel, WeightQuantizer
from mpqc.kernels import fake_quant_dxmax, inferred_bits, pow2_round

from .config import DxmaxConfig, Method
from .driver import Objective, register_objective, task_loss

KB = 8 * 1024  # bits per kilobyte (seed convention: KB = 1024 bytes)


class DxmaxQuantizer(nn.Module):
    """Per-tensor U3 fake-quant with learnable ``d`` and ``xmax``; ``numel`` counts toward the memory penalty."""

    def __init__(self, d: float, xmax: float, *, signed: bool, numel: int, d_range: tuple[float, float],
                 xmax_range: tuple[float, float], min_bits: int = 1, max_bits: int | None = None):
        super().__init__()
        self.signed = bool(signed)
        self.numel = int(numel)
        self.d_range = tuple(d_range)
        self.xmax_range = tuple(xmax_range)
        self.b_min = max(2 if signed else 1, int(min_bits))
        # the most levels x_max / d may reach: max_bits wide, sign included
        self.max_levels = None if max_bits is None else (2 ** (max_bits - 1) - 1 if signed else 2 ** max_bits - 1)
        self.enabled = True
        self.d = nn.Parameter(torch.tensor(float(d)))
        self.xmax = nn.Parameter(torch.tensor(float(xmax)))
        self.project()

    @classmethod
    def for_weight(cls, weight: torch.Tensor, bits: float, cfg: DxmaxConfig) -> DxmaxQuantizer:
        """Seed initialisation for a signed weight at ``bits``."""
        b = max(2, int(round(bits)))
        qmax = 2 ** (b - 1) - 1
        ratio = max(float(weight.detach().abs().max()), 1e-8) / qmax
        exp = math.ceil(math.log2(ratio)) if b > 4 else math.floor(math.log2(ratio))
        d = 2.0**exp
        return cls(d, d * qmax, signed=True, numel=weight.numel(), d_range=cfg.d_range, xmax_range=cfg.xmax_range_w,
                   min_bits=cfg.min_bits, max_bits=cfg.max_bits)

    @classmethod
    def for_activation(cls, aq: ActQuantizer, numel: int, cfg: DxmaxConfig) -> DxmaxQuantizer:
        """Initialisation from a calibrated activation quantizer at its bits."""
        s = max(float(aq.scale.detach().abs()), 1e-8)
        d = 2.0 ** round(math.log2(s))
        qmax = 2 ** (aq.bits - 1) - 1 if aq.signed else 2**aq.bits - 1
        return cls(d, d * qmax, signed=aq.signed, numel=numel, d_range=cfg.d_range, xmax_range=cfg.xmax_range_a,
                   min_bits=cfg.min_bits, max_bits=cfg.max_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return fake_quant_dxmax(x, self.d, self.xmax, signed=self.signed, d_range=self.d_range,
                                xmax_range=self.xmax_range)

    def bits(self) -> int:
        """The inferred bit-width (the seed's formula, x_max snapped to the grid)."""
        return int(inferred_bits(self.d, self.xmax, self.signed, b_min=self.b_min, d_range=self.d_range,
                                 xmax_range=self.xmax_range))

    def soft_bits(self) -> torch.Tensor:
        """The inferred bit-width as a differentiable scalar (straight-through round and ceil)."""
        d = pow2_round(self.d.clamp(*self.d_range))
        levels = self.xmax.clamp(*self.xmax_range) / d
        levels = levels + (torch.round(levels) - levels).detach()
        b = torch.log2(levels + 1) + (1.0 if self.signed else 0.0)
        b = b + (torch.ceil(b) - b).detach()
        return b.clamp_min(self.b_min)

    def step_size(self) -> float:
        """d snapped to its power of two."""
        return float(pow2_round(self.d.detach().clamp(*self.d_range)))

    @torch.no_grad()
    def project(self) -> None:
        """Back into the ranges, with d <= x_max and x_max / d within the widest grid (after every optimizer step)."""
        self.d.clamp_(*self.d_range)
        self.xmax.clamp_(*self.xmax_range)
        if self.max_levels is not None:
            self.xmax.clamp_(max=float(pow2_round(self.d.detach())) * self.max_levels)
        self.d.copy_(torch.minimum(self.d, self.xmax))

    @torch.no_grad()
    def clip_grads(self) -> None:
        """The seed's clipping of the d and x_max gradients to [-d, d] when a memory target is set."""
        lim = float(self.d)
        for p in (self.d, self.xmax):
            if p.grad is not None:
                p.grad.clamp_(-lim, lim)


def _act_numel(q: QuantizedModel) -> dict[str, int]:
    """Activation quantizer key -> elements per sample of the tensor it quantizes."""
    out: dict[str, int] = {}
    for op in q.graph_ir.layers():
        for t, key in zip(op.act_inputs, q.act_keys.get(op.name, [])):
            shape = q.graph_ir.tensors[t].shape
            out[key] = int(math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape))
    return out


def quantized_memory_kb(q: QuantizedModel) -> dict[str, float]:
    """Memory of the quantized tensors of a (baked) QuantizedModel in KB: weights, activations max and sum."""
    w = sum(float(m.bits.double().sum()) * q.weight(_layer_of(q, k)).numel() / m.bits.numel()
            for k, m in q.wq.items() if isinstance(m, WeightQuantizer) and m.enabled)
    numel = _act_numel(q)
    acts = [m.bits * numel[k] for k, m in q.aq.items() if isinstance(m, ActQuantizer) and m.enabled and k in numel]
    return {"weight_kb": w / KB, "act_kb_max": max(acts, default=0) / KB, "act_kb_sum": sum(acts) / KB}


def _layer_of(q: QuantizedModel, wq_key: str) -> str:
    for op in q.graph_ir.layers():
        if q.weight_quantizer(op.name) is q.wq[wq_key]:
            return op.name
    raise KeyError(wq_key)


@register_objective(Method.DXMAX)
class DxmaxObjective(Objective):
    """Learn d, x_max (and the weights) under the memory penalty; the bit-widths follow."""

    def setup(self) -> None:  # noqa: D102
        cfg = self.config.dxmax
        q = self.q
        self.originals: dict[tuple[str, str], nn.Module] = {}
        self.layer_of: dict[str, str] = {}
        for op in q.graph_ir.layers():
            wq = q.weight_quantizer(op.name)
            if wq is not None:
                for k, m in q.wq.items():
                    if m is wq:
                        self.layer_of[k] = op.name
        numel = _act_numel(q)
        device = next(iter(q.parameters())).device
        for k, m in list(q.wq.items()):
            if m.enabled:
                w = q.weight(self.layer_of[k])
                self.originals[("wq", k)] = m
                q.wq[k] = DxmaxQuantizer.for_weight(w, float(m.bits.float().mean()), cfg).to(device)
        for k, m in list(q.aq.items()):
            if m.enabled:
                self.originals[("aq", k)] = m
                q.aq[k] = DxmaxQuantizer.for_activation(m, numel.get(k, 0), cfg).to(device)
        with torch.no_grad():
            s_w, s_a = self.memory_kb()
        # the memory targets: given, or what the plan's widths occupy now (the search's budget, as trained)
        self.weight_kb = cfg.weight_kb if cfg.weight_kb is not None or not cfg.budget_from_plan else float(s_w)
        self.act_kb = cfg.act_kb if cfg.act_kb is not None or not cfg.budget_from_plan else float(s_a)
        super().setup()

    def learned(self, kind: str) -> list[DxmaxQuantizer]:
        """The swapped-in quantizers of ``kind`` ("wq" or "aq")."""
        d = self.q.wq if kind == "wq" else self.q.aq
        return [d[k] for (t, k) in self.originals if t == kind]

    def memory_kb(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_w, S_a) in KB from the inferred bits, differentiable in d and x_max."""
        zero = torch.zeros((), device=self.ctx.device)
        ws = [m.soft_bits() * m.numel for m in self.learned("wq")]
        s_w = torch.stack(ws).sum() / KB if ws else zero
        acts = [m.soft_bits() * m.numel for m in self.learned("aq")]
        if not acts:
            return s_w, zero
        a = torch.stack(acts)
        return s_w, (a.max() if self.config.dxmax.act_mode == "max" else a.sum()) / KB

    def penalty(self) -> torch.Tensor:
        """penalty_w relu(S_w - S_w*)^2 + penalty_a relu(S_a - S_a*)^2 (terms without a target are 0)."""
        cfg = self.config.dxmax
        s_w, s_a = self.memory_kb()
        pen = torch.zeros((), device=s_w.device)
        if self.weight_kb is not None:
            pen = pen + cfg.penalty_w * torch.relu(s_w - self.weight_kb) ** 2
        if self.act_kb is not None:
            pen = pen + cfg.penalty_a * torch.relu(s_a - self.act_kb) ** 2
        return pen

    def loss(self, logits, aux, y, teacher_logits):  # noqa: D102
        base, parts = task_loss(logits, y, teacher_logits, self.config.distill)
        pen = self.penalty()
        parts["memory_penalty"] = pen.detach()
        return base + pen, parts

    def after_backward(self):  # noqa: D102
        cfg = self.config.dxmax
        if cfg.clip_grads and (self.weight_kb is not None or self.act_kb is not None):
            for m in self.learned("wq") + self.learned("aq"):
                m.clip_grads()
        super().after_backward()

    def after_step(self):  # noqa: D102
        for m in self.learned("wq") + self.learned("aq"):
            m.project()

    def end_epoch(self, epoch):  # noqa: D102
        with torch.no_grad():
            s_w, s_a = self.memory_kb()
        return {"weight_kb": float(s_w), "act_kb": float(s_a), "w_bits": self.bits_by_layer()["w"]}

    def bits_by_layer(self) -> dict[str, dict[str, int]]:
        """Inferred bits: ``{"w": {layer: b}, "a": {activation key: b}}``."""
        return {"w": {self.layer_of[k]: self.q.wq[k].bits() for (t, k) in self.originals if t == "wq"},
                "a": {k: self.q.aq[k].bits() for (t, k) in self.originals if t == "aq"}}

    @torch.no_grad()
    def bake(self) -> None:
        """Put LSQ quantizers back at the learned step and inferred bits; clip weights to [-x_max, x_max]."""
        for (kind, k), orig in self.originals.items():
            new = (self.q.wq if kind == "wq" else self.q.aq)[k]
            b, d = new.bits(), new.step_size()
            if kind == "wq":
                w = self.q.weight(self.layer_of[k])
                xmax = float(new.xmax.detach().clamp(*new.xmax_range))
                w.clamp_(-xmax, xmax)
                orig.bits.fill_(b)
                orig.scale.fill_(d)
                orig.enabled = True
                self.q.wq[k] = orig
            else:
                orig.bits = b
                orig.scale.fill_(d)
                self.q.aq[k] = orig

    def _restore(self) -> None:
        for (kind, k), orig in getattr(self, "originals", {}).items():
            (self.q.wq if kind == "wq" else self.q.aq)[k] = orig

    def finish(self):  # noqa: D102
        with torch.no_grad():
            s_w, s_a = self.memory_kb()
        bits = self.bits_by_layer()
        self.bake()
        out = super().finish()
        out.update({"bits": bits, "weight_kb": float(s_w), "act_kb": float(s_a),
                    "targets_kb": {"weight": self.weight_kb, "act": self.act_kb},
                    "memory": quantized_memory_kb(self.q)})
        return out

    def abort(self):  # noqa: D102
        self._restore()
        super().finish()


__all__ = ["DxmaxObjective", "DxmaxQuantizer", "quantized_memory_kb"]
