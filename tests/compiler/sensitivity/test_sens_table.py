"""The sensitivity table: JSON round trip, malformed files, monotone repair, LIMPQ's pickle, and the cache."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from mpqc.compiler.capture import capture
from mpqc.compiler.sensitivity import (
    LayerScores,
    SensitivityCache,
    SensitivityTable,
    cache_key,
    load_table,
    read_limpq_pickle,
    run_sensitivity,
)
from mpqc.errors import UserError


def _table() -> SensitivityTable:
    layers = {
        "conv1": LayerScores({8: 0.01, 4: 0.5, 2: 3.0}, {8: 0.02, 4: 0.2, 2: 1.0},
                             {8: [0.004, 0.006], 4: [0.2, 0.3], 2: [1.0, 2.0]}),
        "layer1.0.conv1": LayerScores({8: 0.001, 4: 0.01, 2: 0.1}, {8: 0.0, 4: 0.0, 2: 0.0}),
        "fc": LayerScores({}, {}, None, {1.0: 2.0, 10.0: 0.2, 1.4677992676220695: 1.3}),
    }
    groups = {"relu": {"consumers": ["layer1.0.conv1"], "a": {8: 0.0, 2: 0.0}}}
    return SensitivityTable("fisher", "abc123", "def456", {"candidates": [8, 4, 2], "form": "block"}, layers,
                            groups, {"time_s": 1.5})


def test_json_round_trip(tmp_path):
    t = _table()
    p = tmp_path / "sub" / "sens.json"
    t.save(p)
    d = json.loads(p.read_text())
    assert d["version"] == 1 and d["method"] == "fisher" and d["model_hash"] == "abc123"
    assert d["layers"]["conv1"]["w"] == {"8": 0.01, "4": 0.5, "2": 3.0}  # bit keys are strings in JSON
    assert d["layers"]["fc"]["e"]["1.4677992676220695"] == 1.3
    back = SensitivityTable.load(p)
    assert back == t
    assert back.layers["fc"].e[1.4677992676220695] == 1.3
    assert [f.name for f in tmp_path.joinpath("sub").iterdir()] == ["sens.json"]  # no temporary left behind


@pytest.mark.parametrize("content, words", [
    ("{not json", "not a JSON"),
    ("[1, 2]", "JSON object"),
    ('{"version": 2, "method": "fisher", "layers": {"a": {}}}', "version 2"),
    ('{"version": 1, "layers": {"a": {}}}', "'method'"),
    ('{"version": 1, "method": "fisher", "layers": {}}', "non-empty"),
    ('{"version": 1, "method": "fisher", "layers": {"c": {"w": {"eight": 1.0}}}}', "not a bit-width"),
    ('{"version": 1, "method": "fisher", "layers": {"c": {"w": {"8": -1.0}}}}', ">= 0"),
    ('{"version": 1, "method": "fisher", "layers": {"c": {"w": {"8": "x"}}}}', "not a number"),
    ('{"version": 1, "method": "fisher", "layers": {"c": {"q": {}}}}', "unknown keys"),
    ('{"version": 1, "method": "fisher", "layers": {"c": {"e": {"0": 1.0}}}}', "> 0"),
    ('{"version": 1, "method": "analog", "layers": {"c": {"e_channel": {"1.0": 0.5}}}}', "non-empty list"),
    ('{"version": 1, "method": "analog", "layers": {"c": {"e_channel": {"x": [0.5]}}}}', "not a number"),
    ('{"version": 1, "method": "analog", "layers": {"c": {"e_channel": {"1.0": [1], "2.0": [1, 2]}}}}',
     "different lengths"),
    ('{"version": 1, "method": "analog", "layers": {"c": {"e_channel": {"1.0": [-1.0]}}}}', ">= 0"),
])
def test_malformed_tables_are_one_line_user_errors(tmp_path, content, words):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(UserError, match=None) as e:
        SensitivityTable.load(p)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


def test_monotone_repair_raises_scores_that_fall_with_fewer_bits():
    t = SensitivityTable("limpq", "", "", {}, {
        "a": LayerScores({8: 0.1, 6: 0.05, 4: 0.3, 2: 0.2}, {8: 1.0, 4: 2.0, 2: 3.0},
                         {8: [0.1, 0.0], 4: [0.05, 0.2], 2: [0.3, 0.1]}, {1.0: 1.0, 10.0: 2.0, 100.0: 0.5}),
    })
    m = t.monotone()
    ls = m.layers["a"]
    assert ls.w == {8: 0.1, 6: 0.1, 4: 0.3, 2: 0.3}  # never lower than at more bits
    assert ls.a == {8: 1.0, 4: 2.0, 2: 3.0}  # already monotone: unchanged
    assert ls.w_channel == {8: [0.1, 0.0], 4: [0.1, 0.2], 2: [0.3, 0.2]}
    assert ls.e == {1.0: 2.0, 10.0: 2.0, 100.0: 0.5}  # more energy never scores higher
    assert m.meta["monotone_repairs"] == 5
    assert t.layers["a"].w[6] == 0.05  # the original is untouched


# ------------------------------------------------------------------------------------------------------------
# LIMPQ's indicator pickle (research/seeds.md §3.2)
def _limpq(names=("module.layer1.0.conv1", "module.layer1.0.downsample.0")) -> dict:
    w = {n: {"6": 0.02, "5": 0.026, "4": 0.044, "3": 0.066, "2": 0.109} for n in names}
    a = {n: {"6": 0.096, "5": 0.137, "4": 0.197, "3": 0.289, "2": 0.441} for n in names}
    return {"weight": w, "act": a, "layer_name": list(names)}


def test_limpq_pickle_strips_module_prefix(tmp_path):
    p = tmp_path / "importance_indicators_resnet50.pkl"
    p.write_bytes(pickle.dumps(_limpq(), protocol=4))
    t = read_limpq_pickle(p)
    assert list(t.layers) == ["layer1.0.conv1", "layer1.0.downsample.0"]
    assert t.layers["layer1.0.conv1"].w == {6: 0.02, 5: 0.026, 4: 0.044, 3: 0.066, 2: 0.109}
    assert t.layers["layer1.0.downsample.0"].a[2] == 0.441
    assert t.method == "limpq"
    assert load_table(p) == t  # recognised by its first byte
    unprefixed = tmp_path / "plain.pkl"
    unprefixed.write_bytes(pickle.dumps(_limpq(("layer2.0.conv1",))))
    assert list(read_limpq_pickle(unprefixed).layers) == ["layer2.0.conv1"]


def test_the_search_reads_tables_through_this_class(tmp_path):
    """One reader: the search's ``read_sensitivity`` returns this table for mpqc's JSON, LIMPQ's pickle and the
    unpickled dict, with the per-layer queries the ILP asks; a layer the table lacks has no scores."""
    from mpqc.compiler.search.problem import read_sensitivity

    t = _table()
    p = tmp_path / "sens.json"
    t.save(p)
    got = read_sensitivity(p)
    assert isinstance(got, SensitivityTable) and got == t and got.source == str(p)
    assert got.w("conv1") == {8: 0.01, 4: 0.5, 2: 3.0} and got.a("layer1.0.conv1")[4] == 0.0
    assert got.w_channel("conv1")[2].tolist() == [1.0, 2.0]
    assert got.e("fc")[10.0] == 0.2
    assert got.w("absent") == {} and got.e("conv1") == {} and got.e_channel("fc") == {}
    pk = tmp_path / "indicators.pkl"
    pk.write_bytes(pickle.dumps(_limpq()))
    limpq = read_sensitivity(pk, monotone=True)
    assert limpq.layers == read_limpq_pickle(pk).monotone().layers and limpq.meta["monotone"]
    assert read_sensitivity(_limpq()).layers == read_limpq_pickle(pk).layers
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_sensitivity(tmp_path / "empty.json")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("payload, words", [
    (b"", "not a readable pickle"),
    (b"\x80\x04garbage", "not a"),
    (pickle.dumps([1, 2, 3]), "holds a dict"),
    (pickle.dumps({"weight": {}, "act": {}}), "'layer_name'"),
    (pickle.dumps({"weight": {}, "act": {}, "layer_name": "conv1"}), "non-empty list"),
    (pickle.dumps({**_limpq(), "act": {}}), "has no \"act\" indicators"),
    (pickle.dumps({**_limpq(("module.c",)), "weight": {"module.c": {"6": "big"}}}), "not a number"),
    (pickle.dumps({**_limpq(("module.c",)), "weight": {"module.c": {"six": 0.1}}}), "not a bit-width"),
    (pickle.dumps({**_limpq(("module.c", "c"))}), "listed twice"),
    (pickle.dumps({"weight": Evil(), "act": {}, "layer_name": ["c"]}), "builtin types"),
    (pickle.dumps({"weight": {"c": {"6": torch.tensor(0.1)}}, "act": {}, "layer_name": ["c"]}), "builtin types"),
])
def test_malformed_limpq_pickles_are_rejected(tmp_path, capsys, payload, words):
    p = tmp_path / "bad.pkl"
    p.write_bytes(payload)
    with pytest.raises(UserError) as e:
        read_limpq_pickle(p)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    assert "never run" not in capsys.readouterr().out


def test_missing_files_are_user_errors(tmp_path):
    for fn in (read_limpq_pickle, SensitivityTable.load, load_table):
        with pytest.raises(UserError, match="not found"):
            fn(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------------------
# cache
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_cache_hit_and_miss(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    data = (torch.randn(48, 6), torch.randint(0, 3, (48,)))
    opts = {"candidates": (8, 4), "samples": 32, "batch_size": 16}
    cache = SensitivityCache(tmp_path / "cache")

    first = run_sensitivity("fisher", capture(model, (torch.randn(2, 6),)), data, opts, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1) and "cached" not in first.meta
    again = run_sensitivity("fisher", capture(model, (torch.randn(2, 6),)), data, opts, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1) and again.meta["cached"]
    assert again.layers == first.layers

    run_sensitivity("fisher", capture(model, (torch.randn(2, 6),)), data, {**opts, "candidates": (8, 2)}, cache=cache)
    run_sensitivity("fisher", capture(model, (torch.randn(2, 6),)), data, {**opts, "form": "diag"}, cache=cache)
    run_sensitivity("fisher", capture(model, (torch.randn(2, 6),)), (data[0] + 1, data[1]), opts, cache=cache)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc1.weight.add_(0.01)
    run_sensitivity("fisher", capture(model, (torch.randn(2, 6),)), data, opts, cache=cache)
    assert (cache.hits, cache.misses) == (1, 5)  # options, data and weights are all part of the key

    # an unreadable entry is a miss, and is rewritten
    key = cache_key(first.model_hash, first.data_hash, "fisher", first.options)
    with open(cache.path(key, "fisher"), "w") as f:
        f.write("{broken")
    model2 = Tiny()
    model2.load_state_dict(original)
    run_sensitivity("fisher", capture(model2, (torch.randn(2, 6),)), data, opts, cache=cache)
    assert cache.misses == 6
    assert SensitivityTable.load(cache.path(key, "fisher")).meta["cache_key"] == key
    assert cache.clear() == 5
