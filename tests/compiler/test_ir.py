"""The IR: JSON round trip, weight and activation groups."""

import torch
import torchvision

from mpqc.compiler.capture import capture
from mpqc.compiler.ir import Graph
from tests.models import TinyBert


def test_json_round_trip_is_exact():
    graph = capture(torchvision.models.mobilenet_v2().eval(), (torch.randn(1, 3, 32, 32),)).graph
    again = Graph.from_json(graph.to_json())
    assert again == graph
    assert [op.name for op in again.layers()] == [op.name for op in graph.layers()]


def test_weight_groups_per_layer_and_per_channel():
    graph = capture(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),)).graph
    layers = graph.weight_groups("layer")
    channels = graph.weight_groups("channel")
    assert len(layers) == 21
    assert len(channels) == sum(op.weight_shape[0] for op in graph.weighted_layers())
    assert channels[0].name == "conv1[0]"


def test_attention_operands_are_activation_groups():
    model = TinyBert().eval()
    graph = capture(model, model.example_inputs()).graph
    mm = [op for op in graph.layers() if op.kind.value == "matmul"]
    names = {g.name for g in graph.act_groups()}
    for op in mm:
        assert set(op.act_inputs) <= names
    nx = graph.to_networkx()
    assert nx.number_of_nodes() == len(graph)


def test_end_layers_are_every_stem_and_every_head():
    """'first'/'last' (--fix, the analog target's digital layers) took one layer in graph order, so a
    two-headed model ran one head analog while the other stayed digital."""
    import torch
    from torch import nn

    from mpqc.compiler.capture import capture

    class TwoStemsTwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.s1, self.s2 = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 5, padding=1)
            self.body = nn.Conv2d(8, 8, 3)
            self.h1, self.h2 = nn.Linear(8, 10), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(torch.cat([self.s1(x), self.s2(x)], 1))).mean((2, 3))
            return self.h1(h) + self.h2(h).sum(1, keepdim=True)

    g = capture(TwoStemsTwoHeads().eval(), (torch.randn(1, 1, 8, 8),)).graph
    assert g.end_layers() == (["s1", "s2"], ["h1", "h2"])
    import numpy as np

    from mpqc.compiler.search import build_problem, parse_budgets, read_sensitivity, solve
    from mpqc.targets import load_target
    from tests.compiler.search.helpers import synthetic_table

    target = load_target("analog")  # digital_layers = ["first", "last"]
    grid = [float(e) for e in target.analog.e_grid()]
    sp = build_problem(g, target, parse_budgets(emac="50"),
                       read_sensitivity(synthetic_table(g, (8,), np.random.default_rng(0), energies=grid)))
    plan = sp.to_plan(solve(sp.problem))
    assert [n for n in ("s1", "s2", "body", "h1", "h2") if plan.emac(n) is None] == ["s1", "s2", "h1", "h2"]
