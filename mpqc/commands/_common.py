"""Options shared by several sub-commands (model loading)."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """``optional``: MODEL may come from ``--config`` instead (checked once the file is read)."""
    p.add_argument("model", metavar="MODEL", **({"nargs": "?"} if optional else {}),
                   help="TorchScript or torch.export (.pt2) file, state dict (with --arch), torchvision:NAME, "
                        "or a pickled nn.Module (with --trust-pickle)")
    p.add_argument("--arch", help="pkg.module:factory building the architecture of a state dict")
    p.add_argument("--weights", help="state dict for a torchvision:NAME model (default: random init)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (unpickling runs code from the file)")
    p.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (default: the model's known one)")


def load_and_capture(args):
    """Load MODEL from the parsed options and capture it into the IR."""
    from mpqc.compiler.capture import capture
    from mpqc.compiler.loading import load_model

    loaded = load_model(args.model, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle,
                        input_shape=args.input_shape)
    return loaded, capture(loaded.module, loaded.example_inputs)
