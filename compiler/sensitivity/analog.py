"""Analog sensitivity: the Fisher-weighted variance of the output noise an analog array adds, per energy per MAC.

On an in-memory-compute target each layer runs at an energy per MAC E from the target's grid, and the noise
model of Garg et al. (research/seeds.md §2.2; ``mpqc.cost_models.analog``) gives the variance σ_c²(E) of the
Gaussian noise added to every output element of channel c (thermal, shot or weight noise; all fall as 1/E).
Independent zero-mean noise n on the outputs y raises the expected loss by ½·E[nᵀHn] = ½·Σ H_diag·σ², so with
the Fisher of the outputs standing in for the Hessian

    score(layer, E) = ½ · Σ_c σ_c²(E) · G_c,    G_c = (1/N)·Σ_i Σ_positions (∂ℓ_i/∂y_{i,c,p})²,

an estimate of the loss increase at energy E (here the diagonal is exact: the noise is independent across
elements). The output gradients are per-sample for free; the ranges R_w and R_x are those of the layer's
calibrated quantizers at the target's widths (s·(2^b − 1), as the noise-aware fine-tuning draws them), and the
weight row norms and mean ‖x_patch‖² come from the float weights and the recorded layer inputs of the sample.
Layers the noise model cannot describe (other than conv2d and linear) get no ``e`` scores. At channel
granularity each channel's term ½·σ_c²(E)·G_c is kept too (``e_channel``): the search can then give every
output channel (an array column) its own E, which is where most of the saving is (bench/RESULTS.md, analog).
"""

from __future__ import annotations

import numpy as np
import torch

from mpqc.compiler.ir import OpKind
from mpqc.cost_models.analog import LayerStats, output_noise_variance
from mpqc.errors import UserError

from ._common import Context, NodeTaps, RawScores, layer_node, weighted_layers

# ranges: "quantizer" (the calibrated quantizers' s·(2^b − 1) at the target's widths, what fine-tuning draws noise
# with) or "float" (2·max|w| and max x − min x of the float weights and inputs, as before 2026-12-08)
DEFAULTS: dict = {"ranges": "quantizer"}


def _stat_args(op) -> dict:
    a = op.attrs
    return {"groups": op.groups, "stride": tuple(a.get("stride", [1, 1])) if isinstance(a.get("stride", 1), list)
            else a.get("stride", 1), "padding": _pad(a.get("padding", 0)),
            "dilation": tuple(a.get("dilation", [1, 1])) if isinstance(a.get("dilation", 1), list)
            else a.get("dilation", 1)}


def _pad(p):
    if isinstance(p, str):
        raise ValueError(f"string padding {p!r}")
    return tuple(p) if isinstance(p, list) else p


@torch.no_grad()
def _quantizer_ranges(qm, layer: str, b_w: int, b_a: int) -> tuple[np.ndarray | None, float | None]:
    """R_w = s_w·(2^b_w − 1) per output channel and R_x = s_a·(2^b_a − 1): the ranges of the layer's calibrated
    quantizers at the target's widths, the ones the noise-aware fine-tuning draws its noise with (Garg et al.'s R
    is the quantizer's full range). None where the layer has no such quantizer (or its input was not observed)."""
    r_w = r_x = None
    wq, w = qm.weight_quantizer(layer), qm.weight(layer)
    if wq is not None:
        on, bits = wq.enabled, (wq.bits.clone() if wq.enabled else None)
        wq.set_bits(b_w, w)
        r_w = (wq.scale.detach().abs().double() * (2**b_w - 1)).cpu().numpy()
        wq.set_bits(bits if on else None, w)
    aqs = qm.act_quantizers(layer)
    if aqs and float(aqs[0].absmax) > 0:
        aq, before = aqs[0], aqs[0].bits
        aq.set_bits(b_a)
        r_x = float(aq.scale.detach().abs()) * (2**b_a - 1)
        aq.set_bits(before)
    return r_w, r_x


def run(ctx: Context) -> RawScores:
    qm, target = ctx.qmodel, ctx.target
    if ctx.params["ranges"] not in ("quantizer", "float"):
        raise UserError(f"analog: ranges must be quantizer or float, not {ctx.params['ranges']!r}")
    per_channel = ctx.options.granularity == "channel"
    grid = [float(e) for e in target.analog.e_grid()]
    ops, skipped = [], {}
    for op in weighted_layers(qm):
        if op.kind in (OpKind.CONV, OpKind.LINEAR) and len(op.weight_shape or []) in (2, 4) \
                and not op.attrs.get("transposed"):
            ops.append(op)
        else:  # the search runs these digitally and says so
            what = "a transposed convolution" if op.attrs.get("transposed") else \
                f"a {len(op.weight_shape) - 2}-d convolution" if op.kind == OpKind.CONV and op.weight_shape \
                else f"a {op.kind.value}"
            skipped[op.name] = f"{what}; the analog noise model covers 2-d convolutions and linear layers"
    node_of = {layer_node(qm, op.name): op for op in ops}
    gsq = {op.name: torch.zeros(op.out_channels, dtype=torch.float64) for op in ops}
    xsq: dict[str, np.ndarray | float] = {}
    rx: dict[str, float] = {}
    n = 0
    runner = NodeTaps(qm.gm, set(node_of))
    with ctx.stage("analog: output gradients", ctx.n_batches()) as tick:
        for x, y in ctx.batches():
            with torch.enable_grad():
                losses = ctx.loss_fn(runner(x), y)
                keys = [k for k in node_of if k in runner.outputs]
                grads = torch.autograd.grad(losses.sum(), [runner.outputs[k] for k in keys], allow_unused=True)
            for k, g in zip(keys, grads):
                op = node_of[k]
                if g is None or op.name in skipped:
                    continue
                g = g.detach().double()
                dim = 1 if op.kind == OpKind.CONV else g.dim() - 1
                gsq[op.name] += g.pow(2).transpose(0, dim).reshape(g.shape[dim], -1).sum(1).cpu()
                inp = runner.args[k][0][0].detach()
                try:
                    st = LayerStats.from_tensors(qm.weight(op.name), inp, **(_stat_args(op) if op.kind == OpKind.CONV
                                                                           else {}))
                except ValueError as e:
                    skipped[op.name] = f"{e}, which the analog noise model does not cover"
                    continue
                prev = xsq.get(op.name, 0.0)
                xsq[op.name] = prev + np.asarray(st.x_patch_sq) * len(x)
                rx[op.name] = max(rx.get(op.name, 0.0), float(st.r_x))
            n += len(x)
            tick()
    raw = RawScores(meta={"samples": n, "noise": target.analog.noise, "e_grid": grid, "unit": target.analog.unit,
                          "digital_layers": list(target.analog.digital_layers), "skipped": skipped})
    b_w, b_a = max(target.weights.bits), max(target.activations.bits)
    for op in ops:
        if op.name in skipped or op.name not in xsq:
            continue
        w = qm.weight(op.name).detach().double()
        rows = w.reshape(w.shape[0], -1)
        r_w, r_x = _quantizer_ranges(qm, op.name, b_w, b_a) if ctx.params["ranges"] == "quantizer" else (None, None)
        stats = LayerStats(r_w=r_w if r_w is not None else (2 * rows.abs().amax(1)).cpu().numpy(),
                           r_x=r_x if r_x is not None else rx[op.name],
                           w_row_norms=rows.norm(dim=1).cpu().numpy(), x_patch_sq=xsq[op.name] / max(n, 1))
        g = gsq[op.name].numpy() / max(n, 1)
        per_e = {e: 0.5 * output_noise_variance(op, e, target, stats) * g for e in grid}
        raw.e[op.name] = {e: float(np.sum(s)) for e, s in per_e.items()}
        if per_channel:
            raw.e_channel[op.name] = {e: [float(v) for v in s] for e, s in per_e.items()}
    return raw


__all__ = ["DEFAULTS", "run"]
