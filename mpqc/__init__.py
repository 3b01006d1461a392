"""mpqc: a hardware-aware deployment compiler for mixed-precision neural networks.

``import mpqc`` stays lean (no torch, no triton, no CUDA): the stages live in ``mpqc.compiler``,
``mpqc.kernels``, ``mpqc.cost_models`` and ``mpqc.targets`` and are imported when used.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "UserError", "compile"]

from mpqc.errors import UserError


def __getattr__(name: str):
    # the Python API mirrors the CLI; imported on first use so `import mpqc` does not pull in torch
    if name == "compile":
        from mpqc.compiler.pipeline import compile as _compile

        return _compile
    raise AttributeError(f"module 'mpqc' has no attribute {name!r}")
