"""PD-QAT: quantization-aware training as a constrained problem, solved primal-dual (Hounie et al.; seeds.md 5.2).

    min  E[task loss of the quantized model]
    s.t. E[ c_l ] <= eps_l  for every quantized layer l      (proximity, optional: ``layerwise``)
         E[ KL(teacher || quantized) ] <= eps_out              (output)

c_l = mean((y_l^q - y_l^fp)^2), divided by mean((y_l^fp)^2) when ``normalize``: y_l^q is layer l as quantized
(fake-quantized weight and input), y_l^fp the same layer with its float weight applied to the same, not
re-quantized, input it receives in the quantized network. As in the seed code, the constraint isolates layer
l's own quantization error: its input is a constant for it (no gradient upstream; letting one flow makes the
network shrink its activations to meet relative constraints). The weights are shared between the two sides,
as the seed's HP and LP models share them, and the gradient follows the seed's split: the float side moves
the latent weights and biases toward what the quantized layer computes (the seed copies back only HP-side
weight gradients), the quantized side moves only the step sizes (LSQ). With straight-through rounding the
two sides' weight gradients would cancel exactly, so letting both flow would teach the weights nothing.

Lagrangian: L = task + sum_l lambda_l (c_l - eps_l) + lambda_out (c_out - eps_out). Primal: one optimizer
step on L per batch. Dual: once per epoch, after the primal epoch, with no gradient and the quantizers in
eval mode, the mean slack s over the training split moves lambda <- max(0, lambda + dual_lr * s).
Deviations from the seed: the primal objective is the *quantized* model's task loss, where the seed minimises
the 32-bit path's CE and lets the quantized one in only through the constraints (mpqc deploys the quantized
network, so its loss is the one to lower; the λ ranking of seeds.md 5.3 is of this problem, not the seed's); the
output constraint uses KL (its CE to soft targets minus the teacher's entropy, a constant); and the teacher is
the frozen float model rather than the shared-weight 32-bit path.
A large final lambda_l marks a layer whose constraint was hard to meet, i.e. a sensitive layer (seeds.md 5.3):
:func:`rank_layers` orders layers by it.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from . import ddp
from .config import Method
from .driver import Objective, register_objective, task_loss


def _is_quantizer(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).split(".")[0] in ("wq", "aq")


class ProximityInterpreter(torch.fx.Interpreter):
    """Runs the quantized GraphModule and, at each watched layer, the same op on the un-quantized operands.

    ``last`` maps layer name -> c_l (a scalar tensor with gradient) after each :meth:`run`.
    """

    def __init__(self, gm: torch.fx.GraphModule, layers: dict[str, str], normalize: bool):
        super().__init__(gm)
        self.layers = layers  # fx node name -> layer name
        self.normalize = normalize
        self.raw: dict[torch.fx.Node, object] = {}
        self.last: dict[str, torch.Tensor] = {}
        watched = [n for n in gm.graph.nodes if n.name in layers]
        self.needed = {a for n in watched for a in n.all_input_nodes if _is_quantizer(a)}

    def run(self, *args):  # noqa: D102
        self.raw.clear()
        self.last = {}
        out = super().run(*args)
        self.raw.clear()
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]
        return out

    def run_node(self, n: torch.fx.Node):  # noqa: D102
        if n in self.needed:
            self.raw[n] = self.env[n.args[0]]  # the quantizer's input, kept until the layer runs
        out = super().run_node(n)
        layer = self.layers.get(n.name)
        if layer is not None:
            self.last[layer] = self._proximity(n)
        return out

    def _proximity(self, n: torch.fx.Node) -> torch.Tensor:
        """c_l on this layer's operands, with the gradient paths of the module docstring."""

        def lp(a):  # quantizers re-run on detached operands: only their step sizes get a gradient
            if a in self.raw:
                return self.fetch_attr(a.target)(_detach(self.raw[a]))
            return _detach(self.env[a])

        def hp(a):  # float weights and biases keep their gradient, the input does not
            if a in self.raw:
                return self.raw[a] if str(a.target).startswith("wq.") else _detach(self.raw[a])
            return self.env[a]

        lp_args, lp_kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lp)
        hp_args, hp_kwargs = torch.fx.node.map_arg((n.args, n.kwargs), hp)
        y_q = n.target(*lp_args, **lp_kwargs)
        y_fp = n.target(*hp_args, **hp_kwargs)
        err = (y_q - y_fp).pow(2).mean()
        if self.normalize:
            err = err / y_fp.detach().pow(2).mean().clamp_min(1e-12)
        return err


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


@register_objective(Method.PDQAT)
class PDQATObjective(Objective):
    """Primal-dual QAT: LSQ's parameters, the Lagrangian as loss, dual ascent once per epoch."""

    uses_teacher = True

    def setup(self) -> None:  # noqa: D102
        super().setup()
        cfg = self.config.pdqat
        nodes = {n.name: n for n in self.q.gm.graph.nodes}
        self.layers: list[str] = []
        watch: dict[str, str] = {}
        if cfg.layerwise:
            for op in self.q.graph_ir.layers():
                node = nodes.get(op.attrs.get("node"))
                wq = self.q.weight_quantizer(op.name)
                quantized = (wq is not None and wq.enabled) or any(a.enabled for a in self.q.act_quantizers(op.name))
                if node is None or node.op != "call_function" or not quantized:
                    continue
                self.layers.append(op.name)
                watch[node.name] = op.name
        self.interp = ProximityInterpreter(self.q.gm, watch, cfg.normalize)
        dev = self.ctx.device
        self.lam = torch.full((len(self.layers),), float(cfg.lambda_layer_init), dtype=torch.float64, device=dev)
        self.lam_out = torch.tensor(float(cfg.lambda_out_init), dtype=torch.float64, device=dev)
        self.history: list[dict] = []  # per dual step: mean constraint values before the update

    def forward(self, x):  # noqa: D102
        logits = self.interp.run(x)
        cons = [self.interp.last[name] for name in self.layers]
        return logits, {"layer": torch.stack(cons) if cons else logits.new_zeros(0)}

    def loss(self, logits, aux, y, teacher_logits):  # noqa: D102
        cfg = self.config.pdqat
        base, parts = task_loss(logits, y, teacher_logits, self.config.distill)
        c_out = output_constraint(logits, teacher_logits)
        c = aux["layer"]
        lam = self.lam.to(c.dtype)
        lagr = base + (lam * (c - cfg.eps_layer)).sum() + self.lam_out.to(c.dtype) * (c_out - cfg.eps_out)
        parts.update({"c_out": c_out.detach(), "c_layer_mean": c.detach().mean() if c.numel() else 0.0})
        return lagr, parts

    # -- the dual step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> tuple[torch.Tensor, float]:
        """Mean constraint values (per layer, output) over the training split (or ``dual_batches`` of it)."""
        cfg = self.config.pdqat
        was = self.q.training
        self.q.train(False)
        sums = torch.zeros(len(self.layers) + 2, dtype=torch.float64, device=self.ctx.device)
        loader = ddp.shard_loader(self.data.train, self.config.eval_batch_size, self.ctx)
        for i, (x, _) in enumerate(loader):
            if cfg.dual_batches is not None and i >= cfg.dual_batches:
                break
            x = x.to(self.ctx.device)
            logits = self.interp.run(x)
            c_out = output_constraint(logits, self.teacher(x))
            nb = len(x)
            for j, name in enumerate(self.layers):
                sums[j] += float(self.interp.last[name]) * nb
            sums[-2] += float(c_out) * nb
            sums[-1] += nb
        self.q.train(was)
        sums = ddp.all_reduce_sum(sums, self.ctx)
        means = sums[:-1] / sums[-1].clamp_min(1)
        return means[:-1].clone(), float(means[-1])

    def start_epoch(self, epoch):  # noqa: D102
        super().start_epoch(epoch)
        if not self.history:  # the constraint values before any training, for the record
            c, c_out = self.measure()
            self.history.append(_row(self.layers, c, c_out, self.lam, self.lam_out, self.config.pdqat, epoch=0))

    def end_epoch(self, epoch):  # noqa: D102
        cfg = self.config.pdqat
        c, c_out = self.measure()
        self.lam = (self.lam + cfg.dual_lr * (c - cfg.eps_layer)).clamp_min(0)
        self.lam_out = (self.lam_out + cfg.dual_lr * (c_out - cfg.eps_out)).clamp_min(0)
        row = _row(self.layers, c, c_out, self.lam, self.lam_out, cfg, epoch=epoch + 1)
        self.history.append(row)
        return {"violation": row["violation"], "c_out": c_out, "dual_out": float(self.lam_out),
                "duals": dict(row["duals"])}

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self):  # noqa: D102
        return {"lam": self.lam.cpu(), "lam_out": self.lam_out.cpu(), "layers": list(self.layers),
                "history": self.history}

    def load_state_dict(self, state):  # noqa: D102
        if list(state["layers"]) != self.layers:
            raise ValueError("the checkpoint's PD-QAT constraints are for other layers; delete it or run without "
                             "resume")
        self.lam = state["lam"].to(self.ctx.device)
        self.lam_out = state["lam_out"].to(self.ctx.device)
        self.history = list(state["history"])

    def finish(self):  # noqa: D102
        out = super().finish()
        out.update({"duals": {n: float(v) for n, v in zip(self.layers, self.lam)}, "dual_out": float(self.lam_out),
                    "history": self.history, "ranking": rank_layers(dict(zip(self.layers, self.lam.tolist())))})
        return out


def output_constraint(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), averaged over the batch."""
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean",
                    log_target=True)


def _row(layers, c, c_out, lam, lam_out, cfg, *, epoch) -> dict:
    row = {"epoch": epoch, "constraints": {n: float(v) for n, v in zip(layers, c)}, "c_out": float(c_out),
           "duals": {n: float(v) for n, v in zip(layers, lam)}, "dual_out": float(lam_out)}
    row["violation"] = violation(row, cfg.eps_layer, cfg.eps_out)
    return row


def violation(row: dict, eps_layer: float, eps_out: float | None = None) -> float:
    """Sum of the positive slacks of one history row (layers, plus the output when ``eps_out`` is given)."""
    v = sum(max(0.0, c - eps_layer) for c in row["constraints"].values())
    if eps_out is not None:
        v += max(0.0, row["c_out"] - eps_out)
    return v


def rank_layers(duals: dict[str, float]) -> list[str]:
    """Layers by decreasing dual variable: the most sensitive first (keep these at higher precision)."""
    return [name for name, _ in sorted(duals.items(), key=lambda kv: (-kv[1], kv[0]))]


__all__ = ["PDQATObjective", "ProximityInterpreter", "output_constraint", "rank_layers", "violation"]
