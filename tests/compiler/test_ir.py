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
