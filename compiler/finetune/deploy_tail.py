"""The last steps of LSQ fine-tuning on the form the export writes.

Two things the exported model does that batch-statistics fine-tuning (:mod:`.renorm`) never shows the weights:
the batch statistics are folded into the convolutions, and each conv bias sits on the int32 accumulator grid
s_in · s_w[c] that integer kernels add (onnxruntime's QLinearConv; the export's deploy graph rounds it the same
way). With 2-bit inputs and weights that grid is coarse next to the following quantizer's step: on CIFAR-10
ResNet-20 at W2A2 the rounding alone cost 0.6 point of top-1 (bench/RESULTS.md, session 5), and a separate
fine-tuning of the deploy graph afterwards did not win it back (it either collapsed or gained 0.2).

So for the last ``FinetuneConfig.deploy_tail`` fraction of the steps, when the cosine schedule's lr is already
small, :class:`DeployTail` folds the batch statistics and rounds every quantized conv's bias onto its grid by
straight-through (:class:`~mpqc.compiler.quantize.BiasQuantizer`); the weights, biases and step sizes go on
training against the deploy numerics. At the end the biases are left on the grid, so the fine-tuned model and
the exported one compute the same thing.
"""

from __future__ import annotations

import torch

from mpqc.compiler.quantize import BiasQuantizer, QuantizedModel, conv_bias_sites

from .graph_taps import insert_after, remove_inserted

ATTR = "tail_bq"


class DeployTail:
    """Switch ``qmodel`` to the deploy form at global step ``start`` (:meth:`enter`); :meth:`leave` at the end.

    ``renorm`` is the run's :class:`~.renorm.Renormalizer` (folded on entry) or None.
    """

    def __init__(self, qmodel: QuantizedModel, renorm, start: int):
        self.q, self.renorm, self.start = qmodel, renorm, int(start)
        self.active = False
        self.rounded = 0  # biases put on the grid
        self.quantizers: dict[str, BiasQuantizer] = {}
        self._nodes: list = []
        self._biases: dict[str, torch.Tensor] = {}

    def info(self, total: int) -> dict:
        """What the run reports: the step the tail began at (of ``total``) and how many biases it rounded."""
        return {"from_step": self.start, "steps": total - self.start, "biases_on_grid": self.rounded}

    def due(self, step: int) -> bool:
        """Whether global step ``step`` (0-based) is in the tail and the tail has not begun."""
        return not self.active and step >= self.start

    @torch.no_grad()
    def enter(self) -> None:
        """Fold the batch statistics, then put a straight-through :class:`BiasQuantizer` on every quantized
        conv's bias."""
        if self.active:
            return
        if self.renorm is not None:
            was = self.q.training
            self.q.train(False)
            self.renorm.fold()
            self.q.train(was)
        gm = self.q.gm
        mods = torch.nn.ModuleDict()
        gm.add_submodule(ATTR, mods)
        for _conv, bias, key, act, weight in conv_bias_sites(gm):
            mods[key] = self.quantizers[key] = BiasQuantizer(act, weight)
            self._biases[key] = self.q._param(str(bias.target))
            self._nodes.append(insert_after(gm, bias, f"{ATTR}.{key}"))
        gm.graph.lint()
        gm.recompile()
        self.rounded = len(self.quantizers)
        self.active = True

    @torch.no_grad()
    def leave(self) -> None:
        """Round the biases onto their grids for good and take the straight-through modules out (idempotent)."""
        if not self.active:
            return
        for key, bq in self.quantizers.items():
            b = self._biases[key]
            b.copy_(bq(b))
        remove_inserted(self.q.gm, self._nodes, ATTR)
        self.quantizers, self._nodes, self._biases = {}, [], {}
        self.active = False


def tail_start(fraction: float, total_steps: int) -> int:
    """The first global step of a tail of ``fraction`` of ``total_steps`` (``total_steps``: no tail)."""
    n = int(round(fraction * total_steps))
    return total_steps - n


__all__ = ["DeployTail", "tail_start"]
