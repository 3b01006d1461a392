"""The ``--device`` option, resolved the same way by every stage that takes one."""

from __future__ import annotations

import torch

from mpqc.errors import UserError


def resolve_device(requested: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; a named device must exist here."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a torch device (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is available; use --device cpu")
    return dev
