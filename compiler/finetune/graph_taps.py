"""Splicing per-layer modules after a layer's output in the quantized GraphModule, and taking them out again.

The noise injector (:mod:`.energy`) and the batch-statistics renormalisation (:mod:`.renorm`) both put a
``call_module`` node right after a layer's fx node for the length of a run; this is that surgery, once.
"""

from __future__ import annotations

import torch
from torch import nn


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


class Splices:
    """The modules spliced after layer outputs for one run, kept in ``gm.<attr>`` (a ModuleDict).

    :meth:`add` one per layer, :meth:`commit` once, :meth:`remove` to restore the graph (idempotent).
    """

    def __init__(self, gm: torch.fx.GraphModule, attr: str):
        self.gm, self.attr = gm, attr
        self.dict = nn.ModuleDict()
        gm.add_submodule(attr, self.dict)
        self.modules: dict[str, nn.Module] = {}  # layer -> its module
        self.nodes: dict[str, torch.fx.Node] = {}
        self.attached = True

    def add(self, layer: str, key: str, module: nn.Module, node: torch.fx.Node) -> None:
        """Register ``module`` as ``<attr>.<key>`` and splice it after ``node`` (the output of ``layer``)."""
        self.dict[key] = module
        self.modules[layer] = module
        self.nodes[layer] = insert_after(self.gm, node, f"{self.attr}.{key}")

    def commit(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()

    def remove(self) -> None:
        if self.attached:
            remove_inserted(self.gm, self.nodes.values(), self.attr)
            self.attached = False
