"""Splicing per-layer modules after a layer's output in the quantized GraphModule, and taking them out again.

The noise injector (:mod:`.energy`) and the batch-statistics renormalisation (:mod:`.renorm`) both put a
``call_module`` node right after a layer's fx node for the length of a run; this is that surgery, once.
"""

from __future__ import annotations

import torch


def insert_after(gm: torch.fx.GraphModule, node: torch.fx.Node, target: str) -> torch.fx.Node:
    """A ``call_module(target)`` node reading ``node``, which every other reader of ``node`` now reads instead."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def remove_inserted(gm: torch.fx.GraphModule, nodes, attr: str) -> None:
    """Undo :func:`insert_after` for ``nodes`` and drop the submodule ``attr`` that held their modules."""
    for node in nodes:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    delattr(gm, attr)
    gm.graph.lint()
    gm.recompile()
