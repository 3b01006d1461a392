"""Count host-to-device copies: each one made with ``.to(device)`` waits for the device to finish its queue (PyTorch
synchronises the stream after a blocking copy), so one inside every fake-quant call made GPU fine-tuning wait ~80
times a step. CI has no GPU, so the tests run the code on the ``meta`` device, whose tensors carry no data, and this
mode records every copy from a CPU tensor onto another device; on CUDA those are the copies that synchronise.
(``torch.tensor(..., device=...)`` copies below the dispatcher and is not seen here: build on the device with
``torch.full`` instead.)"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostToDevice(TorchDispatchMode):
    """``with HostToDevice() as h: ...``; then ``h.copies`` lists (op, where in mpqc) per copy onto a device."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _COPIES:
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if any(t.device.type == "cpu" for t in ins) and any(t.device.type != "cpu" for t in outs):
                where = [ln.strip() for ln in traceback.format_stack()
                         if ("/mpqc/" in ln or "/main/" in ln) and "host_copies.py" not in ln]
                self.copies.append((str(func), " | ".join(w.splitlines()[0] for w in where[-3:])))
        return out
