"""LIMPQ's learned importance indicators (Tang et al., ECCV'22; research/seeds.md §3.1).

Every layer gets one LSQ step size per candidate bit-width, for its weights and for its input activations,
and the whole network is trained jointly: for each batch, every *uniform* policy (all layers at b bits, for
each candidate b) is run and its loss back-propagated, then one *random mixed* policy (each layer draws its
weight bits and its input bits uniformly from the candidates); gradients are clipped by value to 1 and one
SGD step is taken. The learned step size s(l, b) is the indicator: it grows as b shrinks, and LIMPQ's
claim is that its size reflects the layer's importance.

Faithful to the code: per-tensor LSQ, q = s·round(clip(x/s, Q_n, Q_p)), gradient scale 1/√(Q_p·numel), step
sizes lazily initialised to 2·mean|x|/√Q_p on first use and clamped below at 1e-5; SGD with momentum 0.9,
weight decay 2.5e-5 (not on step sizes), cosine to 1e-5, label smoothing 0.1, 3 epochs.

Deviations, because mpqc captures the network with BatchNorm folded into the convolutions:

- *Switchable BN* becomes a per-bit-width, per-output-channel affine (γ_b, β_b; initialised to the identity)
  after every quantized layer, trained jointly. That is a switchable BN whose statistics stay frozen at the
  folded values (inference-mode BN): it keeps what switchable BN is for, letting each bit-width re-scale and
  re-centre the outputs, without statistics that the folded graph no longer has. The affine follows the
  layer's own weight bits (LIMPQ's BN follows the most recently sampled conv).
- Every layer is quantized in pre-training, the first and last included (LIMPQ keeps conv1 and fc in
  float); list layers in ``exclude`` to keep them in float (they then get no indicator).
- Weights are signed and activations follow the IR (unsigned after ReLU-like ops, signed otherwise); the
  upper clamp of s at 1 is dropped because mpqc's inputs are not normalised to LIMPQ's ImageNet range.

Scale: with BN folded, a layer's weights carry its BN's γ/σ, so the raw step sizes mostly rank layers by
their folded weight scale (on the digits CNN the raw 2-bit steps ranked layers like mean|W| with Spearman 0.9,
and against the measured 2-bit loss increase at -0.4..-0.1 over four training seeds). ``normalise="scale"``
(default) divides each indicator by the layer's mean|W| (weights) or mean|a| (activations, from calibration),
i.e. the step in units of the layer's own scale, which is what an unfolded BN would make of it;
``normalise="none"`` gives LIMPQ's raw indicator. Even normalised, the ranking is unstable on that CNN
(-0.3..0.9 over seeds): treat LIMPQ as an importer of published indicators more than as a reliable scorer.

``epochs`` (LIMPQ: 3, on ImageNet) is extended on small samples so that at least ``min_steps`` optimizer steps
are taken. The trained copy is thrown away; the caller's model is not changed.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mpqc.compiler.ir import OpKind
from mpqc.compiler.quantize import QuantizedModel, _key
from mpqc.errors import UserError
from mpqc.kernels import fake_quant

from ._common import Context, RawScores, act_groups, layer_node, weighted_layers

DEFAULTS = {"epochs": 3, "min_steps": 150, "normalise": "scale", "lr": 0.01, "momentum": 0.9, "weight_decay": 2.5e-5,
            "label_smoothing": 0.1, "grad_clip": 1.0, "mixed": True, "switch_affine": True, "exclude": []}


class MultiStepLSQ(nn.Module):
    """A per-tensor LSQ quantizer with one learnable step size per candidate bit-width (``active``: the index)."""

    def __init__(self, candidates: tuple[int, ...], signed: bool):
        super().__init__()
        self.candidates = tuple(candidates)
        self.signed = signed
        self.s = nn.Parameter(torch.ones(len(candidates)))
        self.register_buffer("initialised", torch.zeros(len(candidates), dtype=torch.bool))
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.active
        if i is None:
            return x
        bits = self.candidates[i]
        if not bool(self.initialised[i]):
            qp = (2 ** (bits - 1) - 1) if self.signed else (2 ** bits - 1)
            with torch.no_grad():
                self.s[i] = (2 * x.detach().abs().mean() / math.sqrt(qp)).clamp_min(1e-5)
                self.initialised[i] = True
        return fake_quant(x, self.s[i].clamp_min(1e-5), bits, signed=self.signed)

    def steps(self) -> dict[int, float]:
        return {b: float(self.s[i].detach().clamp_min(1e-5)) for i, b in enumerate(self.candidates)
                if bool(self.initialised[i])}


class SwitchAffine(nn.Module):
    """Per-bit-width per-channel affine after a layer: a switchable BN with frozen (folded) statistics."""

    def __init__(self, n: int, channels: int, channel_dim: int, weight_quantizer: MultiStepLSQ):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(n, channels))
        self.beta = nn.Parameter(torch.zeros(n, channels))
        self.channel_dim = channel_dim
        self.wq = [weight_quantizer]  # a list: not registered twice as a submodule

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        i = self.wq[0].active
        if i is None:
            return y
        shape = [1] * y.dim()
        dim = self.channel_dim % y.dim()
        shape[dim] = y.shape[dim]
        return y * self.gamma[i].reshape(shape) + self.beta[i].reshape(shape)


def _prepare(ctx: Context, exclude: set[str]):
    """A trainable copy with multi-step quantizers and switchable affines; returns (copy, wqs, aqs)."""
    qm: QuantizedModel = ctx.fresh_copy()
    cands = ctx.candidates
    wqs: dict[str, MultiStepLSQ] = {}
    for op in weighted_layers(qm):
        if op.name in exclude:
            continue
        wqs[op.name] = MultiStepLSQ(cands, True).to(ctx.device)
        qm.wq[_key(op.name)] = wqs[op.name]
    aqs: dict[str, MultiStepLSQ] = {}
    for g in act_groups(qm):
        if all(c in exclude for c in g.consumers):
            continue
        aqs[g.key] = MultiStepLSQ(cands, g.quantizer.signed).to(ctx.device)
        qm.aq[g.key] = aqs[g.key]
    if ctx.params["switch_affine"]:
        gm = qm.gm
        sbn = nn.ModuleDict()
        gm.add_submodule("sbn", sbn)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, wq in wqs.items():
            op = qm.graph_ir.ops[name]
            if op.kind not in (OpKind.CONV, OpKind.LINEAR):
                continue
            node = nodes[layer_node(qm, name)]
            sbn[_key(name)] = SwitchAffine(len(cands), op.out_channels, 1 if op.kind == OpKind.CONV else -1,
                                           wq).to(ctx.device)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"sbn.{_key(name)}", (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        gm.graph.lint()
        gm.recompile()
    return qm, wqs, aqs


def run(ctx: Context) -> RawScores:
    p = ctx.params
    if ctx.options.granularity != "layer":
        raise UserError("limpq learns one step size per layer; use --granularity layer")
    epochs = int(p["epochs"])
    if epochs < 1:
        raise UserError("limpq: epochs must be >= 1")
    if p["normalise"] not in ("scale", "none"):
        raise UserError(f"limpq: normalise must be scale or none, not {p['normalise']!r}")
    n_batches = ctx.n_batches(ctx.train)
    epochs = max(epochs, math.ceil(int(p["min_steps"]) / n_batches))  # small data: loop until min_steps
    exclude = set(p["exclude"] or [])
    unknown = exclude - set(ctx.qmodel.act_keys)
    if unknown:
        raise UserError(f"limpq: exclude names unknown layers: {sorted(unknown)[:3]}")
    qm, wqs, aqs = _prepare(ctx, exclude)
    cands = ctx.candidates
    steps = [q.s for q in list(wqs.values()) + list(aqs.values())]
    step_ids = {id(s) for s in steps}
    affine = [prm for n, prm in qm.gm.named_parameters() if n.startswith("sbn.")]
    aff_ids = {id(a) for a in affine}
    weights = [prm for prm in qm.gm.parameters() if id(prm) not in step_ids and id(prm) not in aff_ids]
    for prm in weights + steps + affine:
        prm.requires_grad_(True)
    opt = torch.optim.SGD([{"params": weights, "weight_decay": float(p["weight_decay"])},
                           {"params": steps + affine, "weight_decay": 0.0}],
                          lr=float(p["lr"]), momentum=float(p["momentum"]))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * n_batches), eta_min=1e-5)
    gen = torch.Generator().manual_seed(ctx.options.seed)
    layer_q = list(wqs.items())
    policies = len(cands) + (1 if p["mixed"] else 0)
    qm.train()
    last = 0.0
    with ctx.stage("limpq: joint multi-bit training", epochs * n_batches) as tick:
        for epoch in range(epochs):
            for x, y in ctx.batches(ctx.train, shuffle=True, seed=ctx.options.seed + epoch):
                opt.zero_grad(set_to_none=True)
                for k in range(policies):
                    if k < len(cands):
                        for q in list(wqs.values()) + list(aqs.values()):
                            q.active = k
                    else:  # one random mixed policy: every layer draws its weight and input bits
                        for _, q in layer_q:
                            q.active = int(torch.randint(len(cands), (1,), generator=gen))
                        for q in aqs.values():
                            q.active = int(torch.randint(len(cands), (1,), generator=gen))
                    with torch.enable_grad():
                        loss = F.cross_entropy(qm.gm(x), y, label_smoothing=float(p["label_smoothing"]))
                        loss.backward()
                    last = float(loss.detach())
                if not math.isfinite(last):
                    raise UserError("limpq: the joint training diverged (loss is not finite); lower lr")
                torch.nn.utils.clip_grad_value_(weights + steps + affine, float(p["grad_clip"]))
                opt.step()
                sched.step()
                tick()
    raw = RawScores(meta={"epochs": epochs, "steps": epochs * n_batches, "final_loss": last,
                          "excluded": sorted(exclude), "switch_affine": bool(p["switch_affine"]),
                          "normalise": p["normalise"]})
    for name, q in wqs.items():
        scale = float(ctx.qmodel.weight(name).detach().abs().mean()) if p["normalise"] == "scale" else 1.0
        raw.w[name] = {b: v / max(scale, 1e-12) for b, v in q.steps().items()}
    groups = {g.key: g for g in act_groups(ctx.qmodel)}
    for key, q in aqs.items():
        sample = groups[key].quantizer.sample
        scale = float(sample.abs().mean()) if p["normalise"] == "scale" and sample.numel() else 1.0
        raw.a[key] = {b: v / max(scale, 1e-12) for b, v in q.steps().items()}
    return raw


__all__ = ["DEFAULTS", "MultiStepLSQ", "SwitchAffine", "run"]
