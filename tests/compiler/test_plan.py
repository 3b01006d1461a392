"""Plan files: exact JSON round trip, atomic save, and one-line errors for malformed files."""

from __future__ import annotations

import json
import os

import pytest

from mpqc.compiler.plan import LayerPlan, Plan, layer_edges, plan_costs, uniform_plan
from mpqc.errors import UserError
from mpqc.targets import load_target
from tests.compiler.search.helpers import branchy_graph


def _plan() -> Plan:
    return Plan(target="generic", granularity="channel", act_groups_mode="tensor",
                layers={"conv_a": LayerPlan(8, 8), "conv_b": LayerPlan([4, 2], 4), "fc": LayerPlan(None, 8),
                        "mm": LayerPlan(None, 6, format="fp8"), "an": LayerPlan(8, 8, emac=[10.0, 20.5])},
                act_groups={"relu": 4, "x": None},
                costs={"bitops": {"value": 1.0, "unit": "BOPs", "budget": None, "slack": None, "binding": False}},
                solver={"name": "mckp", "status": "optimal", "objective": 0.5, "gap": 0.0, "time_s": 0.01,
                        "bound": 0.5},
                objective=0.5, sensitivity="sens.json", meta={"note": "x"})


def test_round_trip_is_exact(tmp_path):
    p = _plan()
    assert Plan.from_json(p.to_json()) == p
    path = tmp_path / "sub" / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    assert p.w_bits("conv_b") == [4, 2] and p.a_bits("fc") == 8 and p.mean_w_bits("conv_b") == 3
    assert json.loads(path.read_text())["version"] == 1


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("old")
    _plan().save(path)
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]


def test_infinities_are_written_as_null(tmp_path):
    p = _plan()
    p.solver["bound"] = float("-inf")
    text = p.to_json()
    assert "Infinity" not in text and json.loads(text)["solver"]["bound"] is None


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("{", "not valid JSON"),
    ("[]", "malformed plan"),
    ('{"version": 2, "target": "generic"}', "version 2"),
    ('{"version": 1}', "missing 'target'"),
    ('{"version": 1, "target": "generic", "layers": {"a": {"w_bits": 4}}}', "needs both w_bits and a_bits"),
    ('{"version": 1, "target": "generic", "layers": {"a": {"w_bits": "4", "a_bits": 8}}}', "w_bits must be"),
    ('{"version": 1, "target": "generic", "layers": {"a": {"w_bits": 4, "a_bits": 0}}}', "a_bits must be"),
    ('{"version": 1, "target": "generic", "granularity": "row"}', "granularity"),
    ('{"version": 1, "target": "generic", "oops": 1}', "unknown key 'oops'"),
    ('{"version": 1, "target": "generic", "layers": {"a": {"w_bits": 4, "a_bits": 8, "emac": -1}}}', "emac"),
])
def test_malformed_files_are_one_line_user_errors(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        Plan.load(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Plan.load(tmp_path / "nope.json")


def test_unknown_layer_query_names_it():
    with pytest.raises(KeyError, match="no layer 'zzz'"):
        _plan().w_bits("zzz")


def test_uniform_plan_and_its_costs():
    from mpqc.cost_models import digital

    g = branchy_graph()
    p = uniform_plan(g, 4, 8, "generic")
    assert {n: (lp.w_bits, lp.a_bits) for n, lp in p.layers.items()} == {n: (4, 8) for n in p.layers}
    c = plan_costs(p, g, load_target("generic"))
    assert c["bitops"]["value"] == pytest.approx(sum(digital.bitops(op, 4, 8) for op in g.layers()))
    assert c["size"]["value"] == pytest.approx(sum(op.weight_numel for op in g.weighted_layers()) * 4 / 8)
    numel = {a.name: a.numel for a in g.act_groups()}
    assert c["act_mem"]["value"] == pytest.approx(sum(numel.values()) * 8 / 8)
    assert c["act_mem_max"]["value"] == pytest.approx(max(numel.values()))
    bs = plan_costs(uniform_plan(g, 4, 4, "bitserial"), g, load_target("bitserial"))
    assert {"cycles", "energy", "boundary"} <= set(bs) and bs["boundary"]["value"] == 0


def test_layer_edges_walk_through_non_quantized_ops():
    edges = {(u, v) for u, v, _, _ in layer_edges(branchy_graph())}
    assert edges == {("conv_a", "conv_b"), ("conv_a", "conv_c"), ("conv_b", "fc"), ("conv_c", "fc")}


def test_boundary_costs_count_the_batch_like_the_macs_of_their_row():
    """Captured at batch 3 the MACs (and so cycles) are three forward passes, but each precision boundary was
    priced per sample: a third of its share of the row it joins. Both now scale with the batch alike."""
    import torch
    from torch import nn

    from mpqc.compiler.capture import capture

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10)).eval()
    costs = {}
    for batch in (1, 3):
        g = capture(model, (torch.randn(batch, 3, 8, 8),)).graph
        names = [op.name for op in g.layers()]
        plan = uniform_plan(g, 4, 4, "bitserial")
        plan.layers[names[1]] = LayerPlan(4, 8)  # two boundaries: into and out of the 8-bit conv
        costs[batch] = plan_costs(plan, g, load_target("bitserial"))
    assert costs[1]["boundary"]["value"] > 0
    for row in ("boundary", "cycles", "bitops"):
        assert costs[3][row]["value"] == pytest.approx(3 * costs[1][row]["value"]), row
