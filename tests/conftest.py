"""Test set-up: Triton kernels run on the CPU interpreter; this must happen before any @triton.jit runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
