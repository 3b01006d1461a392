"""PD-QAT's dual variables as sensitivities (Hounie, Elenter & Ribeiro, arXiv 2210.15623; research/seeds.md §5).

Quantization-aware training as a constrained problem: minimise the float (high-precision, HP) loss subject
to the low-precision (LP) network staying close to it,

    min_θ  E[CE(f_θ(x), y)]   s.t.  E[CE_soft(f_θ^b(x), softmax(f_θ(x)))] ≤ ε_out,
                                    e_l(θ) ≤ ε   for every layer l (per-layer proximity constraints),

solved by a short primal–dual run: one Adam step per batch on the Lagrangian L = CE_HP + λ_out·s_out +
Σ_l λ_l·s_l (s = constraint − ε), and once per epoch a dual ascent step λ ← [λ + η·s̄]_+ with the mean slack
s̄ measured over the training sample without gradients. A constraint that is hard to satisfy accumulates a
large λ: the final dual variables rank the layers (§5.3).

As in PD-QAT, a layer's constraint isolates its own error: the HP layer is applied to the *same* input as the
LP layer sees (the LP network's activation), and the constraint gradients reach the shared weights only
through the HP side (the LP values are constants). Differences, because mpqc's layers are not PD-QAT's
clipped [0, 1] activations:

- each layer has two constraints, one for its weights (e_l^w: HP layer vs the layer with quantized weights)
  and one for its input (e_l^a: HP layer vs the layer with quantized input), giving the table's ``w`` and
  ``a`` scores (PD-QAT ties W and A bits and has one constraint per layer);
- the errors are relative, e = ‖z_HP − z_q‖²/‖z_HP‖², so that one ε fits layers of any output scale;
- one primal–dual run per candidate bit-width (``bits``; default: all candidates), each from the original
  weights; the LP step sizes are the model's quantizers at that bit-width, re-fitted to the weights at the
  start of every epoch.

Defaults follow the code where it applies: λ_l = 0 and λ_out = 1 at the start, η = 0.01, ε_out = 0.1, Adam
with lr 1e-3. ``epochs`` is short (2) because only the ranking is wanted; ε (``eps``) defaults to 0 so that
every constraint is active and λ_l accumulates η × the layer's mean relative error along the run.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from mpqc.compiler.quantize import QuantizedModel
from mpqc.errors import UserError

from ._common import Context, RawScores, act_groups, act_scales, layer_node

DEFAULTS = {"epochs": 2, "lr": 1e-3, "lr_dual": 0.01, "eps": 0.0, "eps_out": 0.1, "bits": []}


class _LPRun(torch.fx.Interpreter):
    """The LP forward pass that also evaluates each layer's HP twin and its weight-only / input-only variants."""

    def __init__(self, qm: QuantizedModel, layers: dict[str, str]):
        super().__init__(qm.gm, garbage_collect_values=False)  # a layer reads its quantizers' inputs
        self.layers = layers  # fx node name -> layer name
        self.err_w: dict[str, torch.Tensor] = {}
        self.err_a: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        if n.name not in self.layers:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
        name = self.layers[n.name]
        raw_w, raw_a, q_w, q_a = list(args), list(args), list(args), list(args)
        has_w = has_a = False
        for i, a in enumerate(n.args):
            if not (isinstance(a, torch.fx.Node) and a.op == "call_module"):
                continue
            src = self.env[a.args[0]]
            if str(a.target).startswith("wq."):
                has_w = True
                raw_w[i] = src  # the live weight: the HP side carries the gradient
                q_a[i] = src
                q_w[i] = args[i].detach()
            elif str(a.target).startswith("aq."):
                has_a = True
                raw_w[i] = raw_a[i] = src.detach()
                q_w[i] = src.detach()
                q_a[i] = args[i].detach()
        with torch.enable_grad():
            hp = n.target(*raw_w, **kwargs)
        ref = hp.detach().float().pow(2).sum().clamp_min(1e-12)
        with torch.no_grad():
            out = n.target(*args, **kwargs)
            zw = n.target(*q_w, **kwargs) if has_w else None
            za = n.target(*q_a, **kwargs) if has_a else None
        if zw is not None:
            self.err_w[name] = (hp.float() - zw.float()).pow(2).sum() / ref
        if za is not None:
            self.err_a[name] = (hp.float() - za.float()).pow(2).sum() / ref
        return out

    def __call__(self, x):
        self.err_w, self.err_a = {}, {}
        with torch.no_grad():  # the LP values are constants; only each layer's HP twin records a graph
            out = self.run(x)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def _fit_lp(qm: QuantizedModel, bits: int) -> None:
    """Fit the weight step sizes at ``bits`` to the current weights (MSE), leaving the quantizers off."""
    for layer in qm.act_keys:
        wq = qm.weight_quantizer(layer)
        if wq is not None:
            wq.set_bits(bits, qm.weight(layer))
            wq.enabled = False


def _set_lp(qm: QuantizedModel, bits: int, a_scale: dict, on: bool) -> None:
    """Switch between the HP (float) and the LP network without re-fitting step sizes."""
    for q in qm.wq.values():
        q.enabled = on
    for key, aq in qm.aq.items():
        aq.bits = bits if on else None
        if on:
            aq.scale.data.copy_(a_scale[key][bits])


def _one_run(ctx: Context, bits: int, tick) -> tuple[dict, dict, dict]:
    p = ctx.params
    qm = ctx.fresh_copy()
    groups = act_groups(qm)
    a_scale = act_scales(groups, [bits])
    layers = {layer_node(qm, op.name): op.name for op in qm.graph_ir.layers()}
    weights = qm.model_parameters()
    for w in weights:
        w.requires_grad_(True)
    for s in qm.quant_parameters():
        s.requires_grad_(False)
    opt = torch.optim.Adam(weights, lr=float(p["lr"]))
    eps, eps_out, eta = float(p["eps"]), float(p["eps_out"]), float(p["lr_dual"])
    names = list(layers.values())
    lam_w = {n: 0.0 for n in names}
    lam_a = {n: 0.0 for n in names}
    lam_out = 1.0
    lp = _LPRun(qm, layers)
    for epoch in range(int(p["epochs"])):
        _fit_lp(qm, bits)
        for x, y in ctx.batches(ctx.train, shuffle=True, seed=ctx.options.seed + epoch):
            _set_lp(qm, bits, a_scale, False)
            with torch.enable_grad():
                hp_logits = qm.gm(x)
                loss = F.cross_entropy(hp_logits, y)
            _set_lp(qm, bits, a_scale, True)
            lp_logits = lp(x).detach()
            with torch.enable_grad():
                s_out = -(F.softmax(hp_logits, -1) * F.log_softmax(lp_logits, -1)).sum(-1).mean() - eps_out
                lag = loss + lam_out * s_out
                lag = lag + sum(lam_w[n] * (e - eps) for n, e in lp.err_w.items())
                lag = lag + sum(lam_a[n] * (e - eps) for n, e in lp.err_a.items())
            opt.zero_grad(set_to_none=True)
            lag.backward()
            opt.step()
            tick()
        # dual ascent on the mean slack over the training sample (no gradients)
        sw = {n: 0.0 for n in names}
        sa = {n: 0.0 for n in names}
        so, count = 0.0, 0
        with torch.no_grad():
            for x, _ in ctx.batches(ctx.train):
                _set_lp(qm, bits, a_scale, False)
                hp_logits = qm.gm(x)
                _set_lp(qm, bits, a_scale, True)
                lp_logits = lp(x)
                so += float(-(F.softmax(hp_logits, -1) * F.log_softmax(lp_logits, -1)).sum(-1).sum())
                for n, e in lp.err_w.items():
                    sw[n] += float(e) * len(x)
                for n, e in lp.err_a.items():
                    sa[n] += float(e) * len(x)
                count += len(x)
                tick()
        for n in names:
            if n in lp.err_w:
                lam_w[n] = max(0.0, lam_w[n] + eta * (sw[n] / count - eps))
            if n in lp.err_a:
                lam_a[n] = max(0.0, lam_a[n] + eta * (sa[n] / count - eps))
        lam_out = max(0.0, lam_out + eta * (so / count - eps_out))
    has_w = set(lp.err_w)
    has_a = set(lp.err_a)
    return ({n: lam_w[n] for n in names if n in has_w}, {n: lam_a[n] for n in names if n in has_a},
            {"lambda_out": lam_out})


def run(ctx: Context) -> RawScores:
    p = ctx.params
    if ctx.options.granularity != "layer":
        raise UserError("dual has one constraint per layer; use --granularity layer")
    if int(p["epochs"]) < 1:
        raise UserError("dual: epochs must be >= 1")
    bits_list = [int(b) for b in (p["bits"] or ctx.candidates)]
    bad = [b for b in bits_list if b not in ctx.candidates]
    if bad:
        raise UserError(f"dual: bits {bad[0]} is not one of the candidates {list(ctx.candidates)}")
    qm = ctx.qmodel
    groups = act_groups(qm)
    raw = RawScores(meta={"epochs": int(p["epochs"]), "eps": float(p["eps"]), "lambda_out": {}})
    per_epoch = 2 * ctx.n_batches(ctx.train)
    layer_a: dict[str, dict[int, float]] = {}
    with ctx.stage("dual: primal-dual runs", len(bits_list) * int(p["epochs"]) * per_epoch) as tick:
        for b in bits_list:
            lw, la, info = _one_run(ctx, b, tick)
            for n, v in lw.items():
                raw.w.setdefault(n, {})[b] = v
            for n, v in la.items():
                layer_a.setdefault(n, {})[b] = v
            raw.meta["lambda_out"][b] = info["lambda_out"]
    # the input constraint belongs to the layer; a shared activation group takes the sum of its consumers'
    for g in groups:
        scores: dict[int, float] = {}
        for c in g.consumers:
            for b, v in layer_a.get(c, {}).items():
                scores[b] = scores.get(b, 0.0) + v
        if scores:
            raw.a[g.key] = scores
    return raw


__all__ = ["DEFAULTS", "run"]
