"""IMPQ's margin noise-gain metric (Gonugondla & Shanbhag, ICASSP'22; research/seeds.md §1.2), per output channel.

The metric estimates the probability that quantization noise flips the top-1 decision. For each sample with
logits z and top class ẑ, take the competitors k of ranks 2..``top``; with the margin d_k = z_k − z_ẑ (skipped
when 0), accumulate for every weight element w and every activation element a

    E(w) += (∂d_k/∂w)² / d_k²,        E_act += Σ_a (∂d_k/∂a)² / d_k²

(the gradient of log|d_k|, squared). A quantizer with step Δ adds noise of variance Δ²/12 per element, so

- ``form="theory"`` (default; Sakr & Shanbhag): score(channel c, b) = Δ_{c,b}²/12 · Σ_{w∈c} E(w) / N and
  score(activation, b) = Δ_b²/12 · E_act / N, with Δ the step size of mpqc's quantizer at b bits (per-channel
  MSE steps for weights, the calibrated step for activations) and N the number of samples;
- ``form="code"``: the IMPQ repository's ranking metric, M_c = mean_{w∈c} E(w) · mean_{w∈c}|w| / 2^b and
  M_act = E_act/N · C / 2^b (C the observed activation range), which orders groups as the original code does
  but is not additive across bit-widths (2^−b, not squared).

A layer's score is the sum over its output channels. Per-sample weight gradients use the same machinery as
the Fisher method (``torch.func.vmap`` or a loop).
"""

from __future__ import annotations

import torch

from mpqc.errors import UserError

from ._common import Context, RawScores, Taps, act_groups, act_scales, weighted_layers
from .fisher import chunk_size, per_sample_grads

DEFAULTS = {"top": 5, "form": "theory", "per_sample": "vmap", "chunk": "auto"}
CHUNK_CAP = 8  # "auto" never goes above this many samples per vmap call (each has top − 1 gradients)


def _margins(out: torch.Tensor, top: int) -> torch.Tensor:
    """(B, top−1) gradients-ready d_k/|d_k| for the competitors of ranks 2..top (0 where d_k = 0)."""
    z = out.float().reshape(out.shape[0], -1)
    idx = z.detach().topk(min(top, z.shape[1]), dim=1).indices
    picked = z.gather(1, idx)
    d = picked[:, 1:] - picked[:, :1]
    mag = d.detach().abs()
    return torch.where(mag > 0, d / mag.clamp_min(1e-30), torch.zeros_like(d))


def run(ctx: Context) -> RawScores:
    top, form = int(ctx.params["top"]), ctx.params["form"]
    if top < 2:
        raise UserError("impq: top must be >= 2 (the top class and at least one competitor)")
    if form not in ("theory", "code"):
        raise UserError(f"impq: form must be theory or code, not {form!r}")
    if ctx.params["per_sample"] not in ("vmap", "loop"):
        raise UserError("impq: per_sample must be vmap or loop")
    try:
        chunk = chunk_size(ctx, ctx.params["chunk"], outputs=top - 1, cap=CHUNK_CAP)
    except UserError as e:
        raise UserError(f"impq: {e}") from None
    qm, cands = ctx.qmodel, ctx.candidates
    layers = weighted_layers(qm)
    groups = act_groups(qm)
    scales = act_scales(groups, cands)
    weights = {op.weight_fqn: qm.weight(op.name) for op in layers}
    e_w = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    e_a = {g.key: torch.zeros((), dtype=torch.float64, device=ctx.device) for g in groups}
    n = 0
    fn = lambda out, y: _margins(out, top).reshape(-1)  # noqa: E731 - one sample's K = top − 1 scalars
    with ctx.stage("impq: noise gains", ctx.n_batches()) as tick:
        for x, y in ctx.batches():
            with Taps(groups) as taps, torch.enable_grad():
                m = _margins(qm.gm(x), top)
                keys = [k for k in taps.tensors if taps.tensors[k].requires_grad]
                for k in range(m.shape[1]):  # a sample's activation only reaches its own margins
                    grads = torch.autograd.grad(m[:, k].sum(), [taps.tensors[key] for key in keys],
                                                retain_graph=k + 1 < m.shape[1], allow_unused=True)
                    for key, g in zip(keys, grads):
                        if g is not None:
                            e_a[key] += g.detach().double().pow(2).sum()
            for gs in per_sample_grads(ctx, weights, x, y, fn, mode=ctx.params["per_sample"], chunk=chunk):
                for name, g in gs.items():
                    e_w[name] += g.float().pow(2).sum((0, 1))
            n += len(x)
            tick()
    raw = RawScores(meta={"samples": n, "form": form, "competitors": top - 1, "chunk": chunk})
    n = max(n, 1)
    for op in layers:
        name, wq, w = op.weight_fqn, qm.weight_quantizer(op.name), weights[op.weight_fqn]
        gain = (e_w[name] / n).reshape(w.shape[0], -1)
        chans = {}
        for b in cands:
            if form == "theory":
                wq.set_bits(b, w)
                step = wq.scale.detach().abs().double()
                wq.set_bits(None, w)
                per_ch = step.pow(2) / 12 * gain.double().sum(1)
            else:
                per_ch = gain.double().mean(1) * w.detach().reshape(w.shape[0], -1).abs().double().mean(1) / 2 ** b
            chans[b] = [float(v) for v in per_ch.cpu()]
        raw.w[op.name] = {b: float(sum(v)) for b, v in chans.items()}
        if ctx.options.granularity == "channel":
            raw.w_channel[op.name] = chans
    for g in groups:
        gain = float(e_a[g.key]) / n
        if form == "theory":
            raw.a[g.key] = {b: float(scales[g.key][b]) ** 2 / 12 * gain for b in cands}
        else:
            rng = float(g.quantizer.absmax)
            raw.a[g.key] = {b: gain * rng / 2 ** b for b in cands}
    return raw


__all__ = ["DEFAULTS", "run"]
