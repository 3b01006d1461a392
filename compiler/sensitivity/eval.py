"""Measured sensitivity: quantize one group at b bits, everything else in float, and measure the damage.

The score is the KL divergence KL(p_float ‖ p_quant) of the model's predictive distributions, averaged over
the held-out samples (``metric="kl"``, default), or the increase of the mean loss (``metric="loss"``, clipped
at 0). It is what the other methods predict, at the price of one partial forward pass per (group, candidate).

Batched for large models: the outer loop is over batches, so a batch stays on the device while every
(group, candidate) is tried on it, and each try re-runs only the *cone* of the graph downstream of the changed
quantizer; every other node's value is read from the float run of the same batch (``torch.fx.Interpreter``
with a pre-filled environment). On a ResNet the cone of an average layer is about half the network.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from mpqc.compiler.quantize import _key
from mpqc.errors import UserError

from ._common import Context, RawScores, act_groups, act_scales, weighted_layers

DEFAULTS = {"metric": "kl", "cone": True}


class _Recorder(torch.fx.Interpreter):
    """A float run that keeps every node's value."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def _cone(start: torch.fx.Node) -> set[torch.fx.Node]:
    """``start`` and every node that depends on it."""
    seen, stack = {start}, [start]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def run(ctx: Context) -> RawScores:
    metric = ctx.params["metric"]
    if metric not in ("kl", "loss"):
        raise UserError(f"eval: metric must be kl or loss, not {metric!r}")
    if ctx.options.granularity != "layer":
        raise UserError("eval measures whole layers; use --granularity layer")
    qm, cands = ctx.qmodel, ctx.candidates
    gm = qm.gm
    layers = weighted_layers(qm)
    groups = act_groups(qm)
    scales = act_scales(groups, cands)
    qnode = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(("wq.", "aq."))}
    tries: list[tuple[str, str, object]] = []  # (kind, name/key, fx node of its quantizer)
    for op in layers:
        tries.append(("w", op.name, qnode.get(f"wq.{_key(op.name)}")))
    for g in groups:
        tries.append(("a", g.key, qnode.get(f"aq.{g.key}")))
    cones = {(k, n): (_cone(node) if node is not None and ctx.params["cone"] else None) for k, n, node in tries}
    sums = {(k, n): {b: 0.0 for b in cands} for k, n, _ in tries}
    count = 0
    data = ctx.heldout
    total = ctx.n_batches(data) * len(tries) * len(cands)
    with ctx.stage("eval: quantize one group at a time", total) as tick, torch.no_grad():
        for x, y in ctx.batches(data):
            rec = _Recorder(gm)
            ref = _first(rec.run(x)).float()
            env = rec.env
            logp = F.log_softmax(ref, -1)
            base_loss = ctx.loss_fn(ref, y).double()
            for kind, name, _ in tries:
                cone = cones[(kind, name)]
                keep = None if cone is None else {n: v for n, v in env.items() if n not in cone}
                for b in cands:
                    _set(qm, kind, name, b, scales)
                    try:
                        out = _first(torch.fx.Interpreter(gm).run(x, initial_env=dict(keep)) if keep is not None
                                     else gm(x)).float()
                    finally:
                        _set(qm, kind, name, None, scales)
                    if metric == "kl":
                        val = (logp.exp() * (logp - F.log_softmax(out, -1))).sum(-1).double().sum()
                    else:
                        val = (ctx.loss_fn(out, y).double() - base_loss).sum()
                    sums[(kind, name)][b] += float(val)
                    tick()
            count += len(x)
    unclipped = {f"{k}:{n}": {b: v / max(count, 1) for b, v in s.items()} for (k, n), s in sums.items()}
    raw = RawScores(meta={"samples": count, "metric": metric, "cone": bool(ctx.params["cone"]), "raw": unclipped})
    for (kind, name), s in sums.items():
        scores = {b: max(v / max(count, 1), 0.0) for b, v in s.items()}
        (raw.w if kind == "w" else raw.a)[name] = scores
    return raw


def _set(qm, kind: str, name: str, bits, scales) -> None:
    if kind == "w":
        qm.weight_quantizer(name).set_bits(bits, qm.weight(name))
        return
    aq = qm.aq[name]
    aq.bits = bits
    if bits is not None:
        aq.scale.data.copy_(scales[name][bits])


__all__ = ["DEFAULTS", "run"]
