"""Hessian-trace sensitivity (HAWQ-V2/V3): score(group, b) = (Tr H_group / n)·‖Δ_b‖².

The trace of each group's diagonal Hessian block comes from Hutchinson's estimator, Tr H = E[vᵀHv] over
Rademacher vectors v, with Hessian-vector products by double backward (``torch.autograd``). One probe draws
one v over all weights and one over all activation perturbations: the cross terms between groups vanish in
expectation, so two Hessian-vector products estimate every block's trace (PyHessian shares one v over all
weights). The weights and the activations get separate products (``split``, default) because their mixed
second derivatives are not positive semi-definite (for y = Wx, ∂²L/∂W∂x holds ∂L/∂y itself) and swamped the
activations' small traces: on the CIFAR-10 ResNet-20 seven of 20 activation traces came out negative with
one shared v, none with two. Probe k reads batch k mod (number of batches), so the data are cycled.

Stopping: after ``min_probes``, when every group's standard error is below ``tol`` times its mean (groups whose
trace is below 1e-6 of the largest are ignored), or after ``probes`` probes. A trace still not two standard
errors above zero then gets ``isolate_probes`` probes of its own (v on that group only, no cross terms): on the
ResNet-20 the classifier's weight trace read −1.4 from the shared probes against 2.9 computed in closed form,
and a clamped zero would have let the search quantize it for free.

Weights: H is the Hessian of the mean loss w.r.t. the layer's weight; n = its element count; Δ_b = Q_b(W) − W.
Activations: H is the per-sample Hessian w.r.t. the quantized tensor (a zero perturbation added at the
quantizer), averaged over samples; n = elements per sample; ‖Δ_b‖² = the mean over samples of ‖Q_b(a) − a‖².
As in HAWQ the score has no ½; at channel granularity each output channel uses its own trace and norm.

``form="quadratic"`` replaces the isotropic (Tr H/n)·‖Δ‖² by the group's exact second-order term ΔᵀH_gΔ, still by
Hutchinson's estimator but with the quantization errors as probe directions (one Hessian-vector product per probe,
candidate and, with ``split``, kind); a term the shared signs leave unresolved is recomputed with its direction
confined to its group, which is exact on each batch. HAWQ's form assumes Δ is isotropic w.r.t. H; on the digits CNN
the exact term differs from it by 0.7-2.7x (first conv) up to 15-17x (the residual conv4), and ranks the layers'
measured 2-bit loss increase at Spearman 0.7-1.0 over four training seeds where the trace form gives 0.5-0.9
(issue-4 report).
"""

from __future__ import annotations

import contextlib
import math

import torch

from mpqc.errors import UserError

from ._common import Context, RawScores, Taps, act_delta, act_groups, act_scales, weight_delta, weighted_layers

DEFAULTS = {"form": "trace", "probes": 64, "min_probes": 8, "tol": 0.05, "activations": True, "split": True,
            "isolate_probes": 16}


class _Running:
    """Running mean and variance (Welford) of a tensor of estimates."""

    def __init__(self):
        self.n = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.clone(), torch.zeros_like(x)
            return
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def stderr(self) -> torch.Tensor:
        if self.n < 2:
            return torch.full_like(self.mean, math.inf)
        return (self.m2 / (self.n - 1) / self.n).sqrt()


@contextlib.contextmanager
def _gradients(ctx: Context, groups, weights: dict, x, y):
    """The loss gradient w.r.t. the weights and the tapped activations, with its graph kept for Hessian-vector
    products: yields (taps, activation keys, inputs, grads, indices of the inputs whose gradient has a graph)."""
    with Taps(groups, mode="perturb") as taps, torch.enable_grad():
        loss = ctx.loss_fn(ctx.qmodel.gm(x), y).sum()
        keys = [g.key for g in groups if g.key in taps.perturb]
        inputs = list(weights.values()) + [taps.perturb[key] for key in keys]
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        yield taps, keys, inputs, grads, live


def run(ctx: Context) -> RawScores:
    probes, min_probes, tol = int(ctx.params["probes"]), int(ctx.params["min_probes"]), float(ctx.params["tol"])
    if probes < 1 or min_probes < 1 or not tol > 0:
        raise UserError("hutchinson: probes and min_probes must be >= 1 and tol > 0")
    if int(ctx.params["isolate_probes"]) < 0:
        raise UserError("hutchinson: isolate_probes must be >= 0 (0 turns the isolated pass off)")
    if ctx.params["form"] not in ("trace", "quadratic"):
        raise UserError(f"hutchinson: form must be trace or quadratic, not {ctx.params['form']!r}")
    if ctx.params["form"] == "quadratic":
        if ctx.options.granularity != "layer":
            raise UserError("hutchinson: form=quadratic scores whole layers; use --granularity layer")
        return _quadratic(ctx)
    qm, cands = ctx.qmodel, ctx.candidates
    layers = weighted_layers(qm)
    groups = act_groups(qm) if ctx.params["activations"] else []
    scales = act_scales(groups, cands)
    weights = {op.name: qm.weight(op.name) for op in layers}
    batches = list(ctx.batches())
    gen = torch.Generator(device="cpu").manual_seed(ctx.options.seed)
    w_stats = {n: _Running() for n in weights}  # per output channel
    w_tot = {n: _Running() for n in weights}  # the layer's trace (channels are correlated within a probe)
    a_stats = {g.key: _Running() for g in groups}
    a_norm = {g.key: {b: 0.0 for b in cands} for g in groups}
    a_numel: dict[str, int] = {}
    seen = 0
    used = 0
    with ctx.stage("hutchinson: probes", probes) as tick:
        for k in range(probes):
            x, y = batches[k % len(batches)]
            with _gradients(ctx, groups, weights, x, y) as (taps, keys, inputs, grads, live):
                vs = {i: _rademacher(inputs[i], gen) for i in live}
                parts = _parts(live, len(weights), ctx.params["split"])
                est = {}
                for n_part, part in enumerate(parts):
                    hv = torch.autograd.grad([grads[i] for i in part], [inputs[i] for i in part],
                                             grad_outputs=[vs[i] for i in part], allow_unused=True,
                                             retain_graph=n_part + 1 < len(parts))
                    est.update({i: (vs[i] * h).detach().float() if h is not None else torch.zeros_like(vs[i])
                                for i, h in zip(part, hv)})
            b = len(x)
            for j, name in enumerate(weights):
                e = est.get(j)
                w = weights[name]
                per_ch = (e.reshape(w.shape[0], -1).sum(1) / b) if e is not None else torch.zeros(w.shape[0])
                w_stats[name].add(per_ch.cpu())
                w_tot[name].add(per_ch.sum().reshape(1).cpu())
            for j, key in enumerate(keys):
                e = est.get(len(weights) + j)
                a_stats[key].add(torch.tensor([float(e.sum()) / b if e is not None else 0.0]))
            if k < len(batches):  # the first visit of each batch: the activations' quantization error
                seen += b
                for key in keys:
                    v = taps.values[key]
                    a_numel[key] = v[0].numel()
                    for bits in cands:
                        a_norm[key][bits] += float(act_delta(v, scales[key][bits], bits, qm.aq[key].signed)
                                                   .pow(2).sum())
            used = k + 1
            tick()
            if used >= min_probes and _converged(list(w_tot.values()) + list(a_stats.values()), tol):
                break
    isolated = _isolate(ctx, groups, weights, batches, gen, w_stats, w_tot, a_stats)
    raw = RawScores(meta={"probes": used, "traces": {}, "isolated": isolated})
    for op in layers:
        st = w_stats[op.name]
        tr_ch = st.mean.clamp_min(0)
        w = weights[op.name]
        n_ch = w[0].numel()
        tr = max(float(st.mean.sum()), 0.0)
        raw.meta["traces"][op.name] = float(st.mean.sum())
        raw.w[op.name], chans = {}, {}
        for bits in cands:
            d2 = weight_delta(qm, op.name, bits).pow(2).reshape(w.shape[0], -1).sum(1).double().cpu()
            raw.w[op.name][bits] = tr / w.numel() * float(d2.sum())
            chans[bits] = [float(v) for v in tr_ch / n_ch * d2]
        if ctx.options.granularity == "channel":
            raw.w_channel[op.name] = chans
    for g in groups:
        st = a_stats[g.key]
        if st.mean is None or g.key not in a_numel:
            continue
        tr = max(float(st.mean[0]), 0.0)
        raw.meta["traces"][g.name] = float(st.mean[0])
        raw.a[g.key] = {bits: tr / a_numel[g.key] * a_norm[g.key][bits] / max(seen, 1) for bits in cands}
    return raw


def _unresolved(st: _Running) -> bool:
    """A trace estimate that is not two standard errors above zero."""
    return st.mean is not None and float(st.mean.sum()) - 2 * float(st.stderr().sum()) <= 0


def _isolate(ctx: Context, groups, weights: dict, batches, gen, w_stats, w_tot, a_stats) -> dict[str, int]:
    """Re-estimate every trace the shared probes left unresolved with probes confined to that one group.

    A shared probe's estimate for group g is v_gᵀ(Hv)_g, whose cross terms v_gᵀH_ghv_h vanish only in
    expectation: for a group with a small trace (a confident classifier's last layer, whose curvature is
    1 − ‖p‖² per sample) the other 50-odd groups' terms swamp it, the mean over 64 probes comes out negative,
    and a clamped zero would tell the search the layer is free to quantize. With v confined to g the estimate
    is v_gᵀH_ggv_g, non-negative for a positive semi-definite block (a ReLU network's Hessian is its
    Gauss-Newton matrix), at one Hessian-vector product per group and probe. Returns {group: probes}."""
    n_iso = int(ctx.params["isolate_probes"])
    todo = [("w", n) for n in weights if _unresolved(w_tot[n])] + [("a", k) for k, st in a_stats.items()
                                                                     if _unresolved(st)]
    if not todo or n_iso < 1:
        return {}
    fresh = {(kind, name): _Running() for kind, name in todo}
    fresh_ch = {name: _Running() for kind, name in todo if kind == "w"}
    names = list(weights)
    with ctx.stage("hutchinson: isolated probes", n_iso) as tick:
        for k in range(n_iso):
            x, y = batches[k % len(batches)]
            with _gradients(ctx, groups, weights, x, y) as (taps, keys, inputs, grads, live):
                index = {("w", n): i for i, n in enumerate(names)}
                index.update({("a", key): len(names) + j for j, key in enumerate(keys)})
                for t, (kind, name) in enumerate(todo):
                    i = index.get((kind, name))
                    if i is None or i not in live:
                        fresh[(kind, name)].add(torch.zeros(1))
                        continue
                    v = _rademacher(inputs[i], gen)
                    (h,) = torch.autograd.grad(grads[i], inputs[i], grad_outputs=v, retain_graph=t + 1 < len(todo),
                                               allow_unused=True)
                    e = (v * h).detach().float() if h is not None else torch.zeros_like(v)
                    if kind == "w":
                        per_ch = e.reshape(e.shape[0], -1).sum(1) / len(x)
                        fresh_ch[name].add(per_ch.cpu())
                        fresh[(kind, name)].add(per_ch.sum().reshape(1).cpu())
                    else:
                        fresh[(kind, name)].add(torch.tensor([float(e.sum()) / len(x)]))
            tick()
    for kind, name in todo:
        if kind == "w":
            w_stats[name], w_tot[name] = fresh_ch[name], fresh[(kind, name)]
        else:
            a_stats[name] = fresh[(kind, name)]
    label = {g.key: g.name for g in groups}
    return {name if kind == "w" else label.get(name, name): n_iso for kind, name in todo}


def _quadratic(ctx: Context) -> RawScores:
    """ΔᵀH_gΔ per group and candidate: Hutchinson over groups, with the quantization errors as directions.

    Each probe draws one sign ε_g per group and, per candidate b, takes one Hessian-vector product with
    v = Σ_g ε_g Δ_g,b; ε_g·Δ_g,bᵀ(Hv)_g is an unbiased estimate of Δ_g,bᵀH_ggΔ_g,b (the cross-group terms vanish
    in expectation). Probes run until every score's standard error is below ``tol`` of it, or ``probes``.
    """
    probes, min_probes, tol = int(ctx.params["probes"]), int(ctx.params["min_probes"]), float(ctx.params["tol"])
    qm, cands = ctx.qmodel, ctx.candidates
    layers = weighted_layers(qm)
    groups = act_groups(qm) if ctx.params["activations"] else []
    scales = act_scales(groups, cands)
    weights = {op.name: qm.weight(op.name) for op in layers}
    deltas = {n: {b: weight_delta(qm, n, b) for b in cands} for n in weights}
    batches = list(ctx.batches())
    gen = torch.Generator(device="cpu").manual_seed(ctx.options.seed)
    stats = {(kind, name, b): _Running() for b in cands for kind, name in
             [("w", n) for n in weights] + [("a", g.key) for g in groups]}
    used = 0
    with ctx.stage("hutchinson: probes", probes) as tick:
        for k in range(probes):
            x, y = batches[k % len(batches)]
            with _gradients(ctx, groups, weights, x, y) as (taps, keys, inputs, grads, live):
                signs = {i: float(torch.randint(0, 2, (1,), generator=gen)) * 2 - 1 for i in live}
                names = [("w", n) for n in weights] + [("a", key) for key in keys]
                for b in cands:
                    dirs = {}
                    for i in live:
                        kind, name = names[i]
                        dirs[i] = deltas[name][b] if kind == "w" else act_delta(
                            taps.values[name], scales[name][b], b, qm.aq[name].signed).to(inputs[i].dtype)
                    for part in _parts(live, len(weights), ctx.params["split"]):
                        hv = torch.autograd.grad([grads[i] for i in part], [inputs[i] for i in part],
                                                 grad_outputs=[signs[i] * dirs[i] for i in part], retain_graph=True,
                                                 allow_unused=True)
                        for i, h in zip(part, hv):
                            val = 0.0 if h is None else signs[i] * float((dirs[i] * h).sum()) / len(x)
                            stats[(*names[i], b)].add(torch.tensor([val]))
            used = k + 1
            tick()
            if used >= min_probes and _converged(list(stats.values()), tol):
                break
    isolated = _isolate_quadratic(ctx, groups, weights, deltas, scales, batches, stats)
    raw = RawScores(meta={"probes": used, "form": "quadratic", "isolated": isolated})
    for kind, name, b in stats:
        st = stats[(kind, name, b)]
        if st.mean is None:
            continue
        (raw.w if kind == "w" else raw.a).setdefault(name, {})[b] = max(float(st.mean[0]), 0.0)
    return raw


def _isolate_quadratic(ctx: Context, groups, weights: dict, deltas, scales, batches, stats) -> dict[str, list[int]]:
    """Recompute every ΔᵀH_gΔ the shared signs left unresolved with the direction confined to its group.

    The shared estimate ε_gΔ_gᵀ(Hv)_g carries the cross terms ε_gε_hΔ_gᵀH_ghΔ_h of every other group h, as the
    trace form's shared probes do; confined to g, Δ_gᵀ(HΔ_g)_g is the exact term on that batch, so the pass needs
    no random signs, and its probes are batches (``isolate_probes`` of them at most: a batch seen twice would
    repeat its value and understate the standard error). Returns {group: candidates re-estimated}."""
    n_iso = min(int(ctx.params["isolate_probes"]), len(batches))
    todo = [key for key, st in stats.items() if _unresolved(st)]
    if not todo or n_iso < 1:
        return {}
    qm = ctx.qmodel
    names = list(weights)
    fresh = {key: _Running() for key in todo}
    with ctx.stage("hutchinson: isolated probes", n_iso) as tick:
        for k in range(n_iso):
            x, y = batches[k]
            with _gradients(ctx, groups, weights, x, y) as (taps, keys, inputs, grads, live):
                index = {("w", n): i for i, n in enumerate(names)}
                index.update({("a", key): len(names) + j for j, key in enumerate(keys)})
                for t, (kind, name, b) in enumerate(todo):
                    i = index.get((kind, name))
                    if i is None or i not in live:
                        fresh[(kind, name, b)].add(torch.zeros(1))
                        continue
                    d = deltas[name][b] if kind == "w" else act_delta(
                        taps.values[name], scales[name][b], b, qm.aq[name].signed).to(inputs[i].dtype)
                    (h,) = torch.autograd.grad(grads[i], inputs[i], grad_outputs=d, retain_graph=t + 1 < len(todo),
                                               allow_unused=True)
                    fresh[(kind, name, b)].add(torch.tensor([0.0 if h is None else float((d * h).sum()) / len(x)]))
            tick()
    stats.update(fresh)
    label = {g.key: g.name for g in groups}
    out: dict[str, list[int]] = {}
    for kind, name, b in todo:
        out.setdefault(name if kind == "w" else label.get(name, name), []).append(b)
    return out


def _parts(live: list[int], n_weights: int, split: bool) -> list[list[int]]:
    """The inputs that share one Hessian-vector product: weights and activations apart when ``split``."""
    parts = [[i for i in live if i < n_weights], [i for i in live if i >= n_weights]] if split else [live]
    return [p for p in parts if p]


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int8).to(like.device)
    return (v.to(like.dtype) * 2 - 1)


def _converged(stats: list[_Running], tol: float) -> bool:
    live = [st for st in stats if st.mean is not None]
    if not live:
        return True
    if any(st.n < 2 for st in live):
        return False
    top = max(abs(float(st.mean[0])) for st in live)
    return all(float(st.stderr()[0]) <= tol * abs(float(st.mean[0])) for st in live
               if abs(float(st.mean[0])) > 1e-6 * top)


__all__ = ["DEFAULTS", "run"]
