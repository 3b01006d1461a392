"""The last steps of LSQ fine-tuning with the exported model's bias rounding in the forward pass.

What the exported model does that batch-statistics fine-tuning (:mod:`.renorm`) never shows the weights: each
conv and linear bias sits on the int32 accumulator grid s_in · s_w[c] that integer kernels add (onnxruntime's
QLinearConv and fused Gemm; the export's deploy graph rounds it the same way). With 2-bit inputs and weights
that grid is coarse next to the following quantizer's step: on CIFAR-10 ResNet-20 at W2A2 the rounding alone
cost 0.6 point of top-1 (bench/RESULTS.md, session 5), and a separate fine-tuning of the deploy graph
afterwards did not win it back.

So for the last ``FinetuneConfig.deploy_tail`` fraction of the steps :class:`DeployTail` adds that rounding to
the forward pass and lets the weights, biases and step sizes train against it by straight-through:

- *stats* form (batch statistics on, the default): the batch statistics stay. Each conv's
  :class:`~.renorm.BatchRenorm` adds, per channel, the error e = round(b_f; a·s_in·s_w) − b_f that the fold at
  the end will give its bias b_f = a·b + β (a, β: the eval-mode map of the running statistics). Eval mode then
  computes exactly what the folded, rounded model does, and training keeps its normalised parametrisation.
- *folded* form (``batch_stats=False``, the graph has no statistics to keep): a straight-through
  :class:`~mpqc.compiler.quantize.BiasQuantizer` on each conv bias in the graph. A linear layer has no
  statistics either way, so its bias gets that in both forms.

A first version folded the batch statistics on entry and trained the folded graph; at W2A2 that closed the
ONNX gap but lost 4.6 points of uniform accuracy in 39 steps at lr ≤ 5·10⁻⁴ (RESULTS.md, session 6): a
2-bit network without normalisation is fragile even at a small lr. At the end the biases are left on the grid,
so the fine-tuned model and the exported one compute the same thing.
"""

from __future__ import annotations

import torch

from mpqc.compiler.quantize import BiasQuantizer, QuantizedModel, bias_sites

from .graph_taps import insert_after, remove_inserted

ATTR = "tail_bq"
STATS, FOLDED = "stats", "folded"


class _FoldRounding:
    """The offset a :class:`~.renorm.BatchRenorm` adds in the tail: the rounding its folded bias will get."""

    def __init__(self, bias: torch.Tensor, bq: BiasQuantizer):
        self.bias, self.bq = bias, bq

    def __call__(self, mod) -> torch.Tensor:
        a, b = mod.affine()
        return self.bq.error(a * self.bias.detach() + b, a)


class DeployTail:
    """Put ``qmodel`` in the tail at global step ``start`` (:meth:`enter`); :meth:`leave` at the end.

    ``renorm`` is the run's :class:`~.renorm.Renormalizer` or None (then the graph is already folded).
    """

    def __init__(self, qmodel: QuantizedModel, renorm, start: int):
        self.q, self.renorm, self.start = qmodel, renorm, int(start)
        self.form = STATS if renorm is not None else FOLDED
        self.active = False
        self.rounded = 0  # biases put on the grid
        self.quantizers: dict[str, BiasQuantizer] = {}
        self._nodes: list = []
        self._biases: dict[str, torch.Tensor] = {}
        self._renorms: list = []

    def info(self, total: int) -> dict:
        """What the run reports: the step the tail began at (of ``total``), its form, how many biases it rounded."""
        return {"from_step": self.start, "steps": total - self.start, "form": self.form,
                "biases_on_grid": self.rounded}

    def due(self, step: int) -> bool:
        """Whether global step ``step`` (0-based) is in the tail and the tail has not begun."""
        return not self.active and step >= self.start

    @torch.no_grad()
    def enter(self) -> None:
        """Give every quantized conv's bias its grid: an offset in its batch renormalisation (stats form), else a
        straight-through :class:`BiasQuantizer` in the graph."""
        if self.active:
            return
        gm = self.q.gm
        # a site's renorm module is the one after the conv whose weight quantizer the site reads
        renorms = ({id(self.q.weight_quantizer(name)): mod for name, mod in self.renorm.modules.items()}
                   if self.renorm is not None else {})
        mods = torch.nn.ModuleDict()
        gm.add_submodule(ATTR, mods)
        for _conv, bias, key, act, weight in bias_sites(gm):
            bq = self.quantizers[key] = BiasQuantizer(act, weight)
            self._biases[key] = self.q._param(str(bias.target))
            renorm = renorms.get(id(weight))
            if renorm is not None:
                renorm.offset = _FoldRounding(self._biases[key], bq)
                self._renorms.append(renorm)
            else:
                mods[key] = bq
                self._nodes.append(insert_after(gm, bias, f"{ATTR}.{key}"))
        if self._nodes:
            gm.graph.lint()
            gm.recompile()
        else:
            delattr(gm, ATTR)
        self.rounded = len(self.quantizers)
        self.active = True

    @property
    def changes_graph(self) -> bool:
        """Whether :meth:`enter` put modules into the graph (a DDP wrapper must be built anew)."""
        return bool(self._nodes)

    @torch.no_grad()
    def leave(self) -> None:
        """Fold the batch statistics, round the biases onto their grids for good and take the tail's parts out
        (idempotent)."""
        if not self.active:
            return
        for mod in self._renorms:
            mod.offset = None
        if self.renorm is not None:
            was = self.q.training
            self.q.train(False)
            self.renorm.fold()  # the grids below are the folded ones: s_w already scaled by the map's gain
            self.q.train(was)
        for key, bq in self.quantizers.items():
            b = self._biases[key]
            b.copy_(bq(b))
        if self._nodes:
            remove_inserted(self.q.gm, self._nodes, ATTR)
        self.quantizers, self._nodes, self._biases, self._renorms = {}, [], {}, []
        self.active = False


def tail_start(fraction: float, total_steps: int) -> int:
    """The first global step of a tail of ``fraction`` of ``total_steps`` (``total_steps``: no tail); a positive
    fraction gets at least its last step (0.01 of 44 steps rounded to none, and the biases were never put on
    their grid)."""
    n = int(round(fraction * total_steps))
    if fraction > 0 and total_steps > 0:
        n = max(n, 1)
    return total_steps - n


__all__ = ["FOLDED", "STATS", "DeployTail", "tail_start"]
