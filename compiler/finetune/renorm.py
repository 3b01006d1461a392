"""Batch statistics while fine-tuning a BN-folded graph, folded back into the convolutions afterwards.

The compiler captures inference graphs with BatchNorm folded into the convolutions, so plain QAT on them trains a
network without normalisation, which only tolerates a small lr (on the H100 run, CIFAR-10 ResNet-20 at W2A4 kept
89.7 % at lr 0.001 and collapsed to 47 % at 0.01; bench/RESULTS.md). :class:`BatchRenorm` after each convolution
brings back what training-mode BN does. In training, the conv output z is normalised with the batch's per-channel
mean and variance and mapped to a learned mean ``bias`` and scale ``|gain|``, and running statistics are kept. In
eval mode it is the per-channel affine map y = a·z + b, a = |gain|/sqrt(running_var + eps) > 0.

It starts as the identity: running statistics from calibration data, gain = sqrt(var + eps), bias = mean. So the
model begins exactly where the folded one was. :meth:`Renormalizer.fold` ends it: each conv's weight rows and its
weight quantizer's step sizes are multiplied by a, and its bias becomes a·bias + b. Per-channel fake quantization
commutes with a positive per-channel scale (q(a·w; a·s) = a·q(w; s)), so the folded model computes what the
eval-mode model did, on the graph that was captured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpqc.compiler.ir import OpKind
from mpqc.compiler.quantize import QuantizedModel

from .graph_taps import Splices


class BatchRenorm(nn.Module):
    """Training-mode BatchNorm over an already-normalised (folded) conv output; identity-initialised."""

    follows_train_mode = True  # QuantizedModel.train() switches it with the quantizers

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.observing = False
        self._stats: list[torch.Tensor] | None = None
        # a per-channel offset added to the output, computed from the module each forward (the deploy tail's
        # bias rounding, :mod:`.deploy_tail`); a plain attribute, so it adds no state
        self.offset: Callable[[BatchRenorm], torch.Tensor] | None = None

    @staticmethod
    def _dims(z: torch.Tensor) -> list[int]:
        return [0, *range(2, z.dim())]

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.observing:  # calibration: sums for the initial statistics, output unchanged
            dims = self._dims(z)
            zd = z.detach().double()
            n = zd.numel() // zd.shape[1]
            s = [torch.full((), float(n), dtype=torch.float64, device=z.device), zd.sum(dims), (zd * zd).sum(dims)]
            self._stats = s if self._stats is None else [a + b for a, b in zip(self._stats, s)]
            return z
        if self.training and z.numel() > z.shape[1]:
            # one fused op, forward and backward: the explicit chain (:meth:`explicit`) took 3-4x as long on the
            # CPU (bench/bench_train_step.py --qat). Like BatchNorm it normalises with the batch's biased variance
            # and keeps the unbiased one in running_var.
            y = F.batch_norm(z, self.running_mean, self.running_var, self.gain.abs(), self.bias, True,
                             self.momentum, self.eps)
        else:  # eval mode, or one value per channel (no variance to learn from: the running statistics stay)
            y = self.explicit(z, update=False)
        if self.offset is not None:
            y = y + self.offset(self).to(y.dtype).reshape((1, -1) + (1,) * (z.dim() - 2))
        return y

    def explicit(self, z: torch.Tensor, update: bool = True) -> torch.Tensor:
        """The same map as separate mean / var / normalise / affine ops (no offset): the reference the fused
        training path is tested and timed against. In training mode it updates the running statistics (the
        variance unbiased, as BatchNorm and the fused path keep it) when ``update``."""
        dims = self._dims(z)
        shape = (1, -1) + (1,) * (z.dim() - 2)
        if self.training:
            mean, var = z.mean(dims), z.var(dims, unbiased=False)
            n = z.numel() // z.shape[1]
            if update and n > 1:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(var.detach().to(self.running_var.dtype) * (n / (n - 1)), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        zn = (z - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        return zn * self.gain.abs().reshape(shape) + self.bias.reshape(shape)

    def start_from_observed(self) -> None:
        """Running statistics from the observed sums; gain and bias so that eval mode is the identity."""
        if self._stats is None:
            raise RuntimeError("BatchRenorm saw no calibration batch")
        n, s, ss = self._stats
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.running_mean.copy_(mean.float())
            self.running_var.copy_(var.float())
            self.gain.copy_(torch.sqrt(var + self.eps).float())
            self.bias.copy_(mean.float())
        self._stats = None
        self.observing = False

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the eval-mode map y = a·z + b, a > 0 per channel."""
        a = self.gain.detach().abs() * torch.rsqrt(self.running_var + self.eps)
        return a, self.bias.detach() - a * self.running_mean


class Renormalizer:
    """Attach a :class:`BatchRenorm` after every conv of ``qmodel`` that has a bias (the folded ones), except a
    conv whose weight another conv shares: its uses would fold two maps into the one weight.

    ``Renormalizer(q).calibrate(batches)`` sets the identity start; :meth:`fold` merges the maps into the convs
    and takes the modules out of the graph again.
    """

    def __init__(self, qmodel: QuantizedModel):
        self.q = qmodel
        gm = qmodel.gm
        self._splices = Splices(gm, "renorm")
        self.modules: dict[str, BatchRenorm] = self._splices.modules  # type: ignore[assignment]
        nodes = {n.name: n for n in gm.graph.nodes}
        uses = Counter(op.weight_fqn for op in qmodel.graph_ir.layers() if op.weight_fqn)
        for op in qmodel.graph_ir.layers():
            if op.kind != OpKind.CONV or not op.weight_fqn or not op.bias_fqn:
                continue
            if uses[op.weight_fqn] > 1:  # a conv applied twice: one weight cannot take two folded maps
                continue
            node = nodes[op.attrs["node"]]
            weight = qmodel.weight(op.name)
            mod = BatchRenorm(weight.shape[0]).to(weight.device)
            mod.training = qmodel.training
            self._splices.add(op.name, f"r{len(self._splices.dict)}", mod, node)
        self._splices.commit()

    @torch.no_grad()
    def calibrate(self, batches, device) -> None:
        """Observe conv outputs on ``batches`` (x or (x, y)) in eval mode: the identity start."""
        was = self.q.training
        self.q.train(False)
        for m in self.modules.values():
            m.observing, m._stats = True, None
        try:
            for b in batches:
                x = b[0] if isinstance(b, (tuple, list)) else b
                self.q(x.to(device))
            for m in self.modules.values():
                m.start_from_observed()
        finally:
            for m in self.modules.values():
                m.observing = False
            self.q.train(was)

    @torch.no_grad()
    def fold(self) -> None:
        """Merge each eval-mode map into its conv (weight rows, bias, weight step sizes) and detach (idempotent)."""
        if not self._splices.attached:
            return
        q = self.q
        for name, mod in self.modules.items():
            op = q.graph_ir.ops[name]
            a, b = mod.affine()
            w = q.weight(name)
            bias = q._param(op.bias_fqn)
            shape = (-1,) + (1,) * (w.dim() - 1)
            w.mul_(a.to(w.dtype).reshape(shape))
            bias.copy_(a.to(bias.dtype) * bias + b.to(bias.dtype))
            wq = q.weight_quantizer(name)
            if wq is not None:
                wq.scale.mul_(a.to(wq.scale.dtype))
        self.remove()

    def remove(self) -> None:
        """Take the modules out of the graph without folding (the model is the folded one again only if
        :meth:`fold` ran or nothing was trained)."""
        self._splices.remove()


__all__ = ["BatchRenorm", "Renormalizer"]
