"""Target descriptions: built-ins load, malformed files fail with one clear line, capabilities filter candidates."""

from __future__ import annotations

import numpy as np
import pytest

from mpqc.errors import UserError
from mpqc.targets import SchemaError, Target, list_targets, load_target
from mpqc.targets.schema import OperandSpec

BASE = """\
name = "t"
kind = "digital"
[weights]
bits = [4, 8]
[activations]
bits = [4, 8]
[costs]
models = ["bitops", "size"]
"""

ANALOG = """\
name = "a"
kind = "analog"
[weights]
bits = [8]
[activations]
bits = [8]
[costs]
models = ["energy", "emac"]
[analog]
e_grid = {min = 1.0, max = 100.0, points = 5}
noise = "thermal"
"""


def _sub(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


# (case id, TOML text, the key the message must name, a word of the problem)
MALFORMED = [
    ("unknown top key", 'nam = "x"\n' + BASE, "nam", "did you mean 'name'"),
    ("unknown nested key", _sub(BASE, "bits = [4, 8]\n[activations]", "bitz = [4]\n[activations]"),
     "weights.bitz", "unknown key"),
    ("wrong type", _sub(BASE, "bits = [4, 8]\n[activations]", 'bits = "4"\n[activations]'),
     "weights.bits", "expected a list of integers"),
    ("bits too low", _sub(BASE, "bits = [4, 8]\n[activations]", "bits = [1, 4]\n[activations]"),
     "weights.bits", "1 is out of range"),
    ("bits too high", _sub(BASE, "[activations]\nbits = [4, 8]", "[activations]\nbits = [4, 9]"),
     "activations.bits", "9 is out of range"),
    ("16 bits without a half format", _sub(BASE, "bits = [4, 8]\n[activations]", "bits = [8, 16]\n[activations]"),
     "weights.bits", "16 needs"),
    ("duplicate value", _sub(BASE, "bits = [4, 8]\n[activations]", "bits = [4, 4]\n[activations]"),
     "weights.bits", "duplicate value 4"),
    ("missing costs", BASE.split("[costs]")[0], "costs", "missing"),
    ("empty cost models", _sub(BASE, '["bitops", "size"]', "[]"), "costs.models", "is empty"),
    ("unknown cost model", _sub(BASE, '"size"]', '"speed"]'), "costs.models", "unknown cost model 'speed'"),
    ("cost model without coefficients", _sub(BASE, '"size"]', '"cycles"]'), "costs.cycles", "needs coefficients"),
    ("coefficients without cost model", BASE + "[costs.cycles]\nslice_bits = 2\n", "costs.cycles", "not in"),
    ("negative coefficient", _sub(BASE, '"size"]', '"energy"]') + "[costs.energy]\nc0 = 0.1\nc_wa = -1\n",
     "costs.energy.c_wa", "negative"),
    ("bool for int", _sub(BASE, '"size"]', '"cycles"]') + "[costs.cycles]\nslice_bits = true\n",
     "costs.cycles.slice_bits", "expected an integer"),
    ("unknown op type in a rule", BASE + '[[rules]]\nops = ["convolution"]\npairs = [[8, 8]]\n',
     "rules[0].ops", "unknown op type 'convolution'"),
    ("op kind in two rules", BASE + '[[rules]]\nops = ["conv"]\n[[rules]]\nops = ["linear", "conv"]\n',
     "rules[1].ops", "already in rules[0]"),
    ("rule pair not allowed", BASE + '[[rules]]\nops = ["conv"]\npairs = [[2, 8]]\n', "rules[0].pairs", "[2, 8]"),
    ("rule weight-only width not allowed", BASE + '[[rules]]\nops = ["linear"]\nweight_only_bits = [2]\n',
     "rules[0].weight_only_bits", "2 is not an allowed width"),
    ("unknown kind", _sub(BASE, '"digital"', '"quantum"'), "kind", "unknown kind 'quantum'"),
    ("fixed width not allowed", BASE + "[fixed]\nfirst = 3\n", "fixed.first", "w = 3"),
    ("fixed energy on a digital target", BASE + "[fixed]\nfc = {e = 10.0}\n", "fixed.fc", "analog"),
    ("analog without [analog]", ANALOG.split("[analog]")[0], "analog", "missing"),
    ("E grid min not positive", _sub(ANALOG, "min = 1.0", "min = 0.0"), "analog.e_grid.min", "not positive"),
    ("E grid max below min", _sub(ANALOG, "max = 100.0", "max = 0.5"), "analog.e_grid.max", "not above min"),
    ("E grid one point", _sub(ANALOG, "points = 5", "points = 1"), "analog.e_grid.points", "out of range"),
    ("unknown noise model", _sub(ANALOG, '"thermal"', '"pink"'), "analog.noise", "unknown noise model 'pink'"),
    ("DAC narrower than activations", ANALOG + "dac_bits = 6\n", "analog.dac_bits", "below the widest"),
    ("digital model on analog target", _sub(ANALOG, '"emac"]', '"cycles"]'), "costs.models", "'cycles'"),
    ("duplicate TOML key", 'name = "again"\n' + BASE, "name", "duplicate key"),
    ("TOML syntax error", BASE + "[costs.cycles\n", "[costs.cycles", "TOML syntax error"),
]


@pytest.mark.parametrize("text,key,problem", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_target_is_rejected_with_one_clear_line(tmp_path, text, key, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_target(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert key in msg and problem in msg
    assert ";" in msg  # the fix follows the problem


def test_base_of_the_malformed_cases_is_valid(tmp_path):
    for name, text in (("base.toml", BASE), ("analog.toml", ANALOG)):
        (tmp_path / name).write_text(text)
        load_target(str(tmp_path / name))


def test_builtins_all_load_and_round_trip():
    names = list_targets()
    assert set(names) >= {"generic", "bitserial", "analog", "ort-cpu", "cuda", "tensorrt"}
    for name in names:
        t = load_target(name)
        assert t.name == name
        assert Target.from_dict(t.to_dict()) == t
        assert t.cost_models


def test_user_target_from_a_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(BASE + '[fixed]\nfirst = 8\nlayer1.0.conv1 = {w = 4}\n"fc" = {w = 8, a = 8}\n')
    t = load_target(path)
    assert t.name == "t" and t.source == str(path)
    assert t.fixed == {"first": {"w": 8, "a": 8}, "layer1.0.conv1": {"w": 4, "a": None}, "fc": {"w": 8, "a": 8}}
    assert t.candidates("conv") == [(4, 4), (4, 8), (8, 4), (8, 8)]
    assert Target.from_dict(t.to_dict()) == t


def test_unknown_builtin_suggests_a_name_and_missing_path_is_clear():
    with pytest.raises(UserError, match="did you mean 'bitserial'"):
        load_target("bitseral")
    with pytest.raises(UserError, match="target file not found"):
        load_target("/nonexistent/target.toml")


def test_tensorrt_capabilities():
    t = load_target("tensorrt")
    assert t.symmetric_acts and t.symmetric_weights
    conv = t.candidate_specs("conv")
    assert {(c.w_bits, c.a_bits, c.format) for c in conv} == {(8, 8, "int"), (8, 8, "fp8"), (None, None, "float")}
    assert all(c.w_bits != 4 for c in conv)  # no INT4 conv
    assert (4, None) in t.candidates("linear")  # INT4 weight-only on MatMul/Gemm
    assert (4, 8) not in t.candidates("linear")  # INT4 only weight-only
    assert (4, None) not in t.candidates("matmul")  # weight-only means nothing for activation x activation
    assert t.candidates("embedding") == [(None, None)]


def test_ort_cpu_capabilities():
    t = load_target("ort-cpu")
    assert t.candidates("conv") == [(8, 8), (None, None)]  # int8 conv, fp32; no int4 conv
    assert t.candidates("linear") == [(8, 8), (4, None), (None, None)]  # int4 weight-only matmul
    assert t.candidates("matmul") == [(8, 8), (None, None)]
    assert not t.symmetric_acts and t.float_bits == 32 and t.costs.latency.runtime == "onnxruntime-cpu"


def test_cuda_candidates_carry_formats():
    t = load_target("cuda")
    labels = [c.label for c in t.candidate_specs("linear")]
    assert labels == ["bf16", "W8A8", "W8A8:fp8", "W4Afloat"]
    assert t.float_bits == 16


def test_generic_and_bitserial_take_every_pair():
    g = load_target("generic")
    assert len(g.candidates("conv")) == 49 and g.granularities == ("layer", "channel")
    b = load_target("bitserial")
    assert b.candidates("linear") == [(w, a) for w in (2, 4, 8) for a in (2, 4, 8)]
    assert b.costs.cycles.slice_bits == 2 and b.costs.energy.per_mac(8, 8) == pytest.approx(0.03 + 0.2)


def test_non_quantizable_kinds_have_no_candidates_and_unknown_kinds_raise():
    t = load_target("generic")
    assert t.candidates("add") == [] and t.candidates("pool") == []
    with pytest.raises(ValueError, match="unknown op kind"):
        t.candidates("banana")


def test_analog_target_may_fix_an_energy(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(ANALOG.replace("[analog]", '[fixed]\n"fc" = {e = 50.0}\n[analog]'))
    t = load_target(path)
    assert t.fixed == {"fc": {"w": None, "a": None, "e": 50.0}}
    assert Target.from_dict(t.to_dict()) == t


def test_analog_target_grid_is_geometric():
    t = load_target("analog")
    grid = t.analog.e_grid()
    assert len(grid) == 25 and grid[0] == pytest.approx(1.0) and grid[-1] == pytest.approx(10000.0)
    ratios = grid[1:] / grid[:-1]
    assert np.allclose(ratios, ratios[0])
    assert t.analog.noise == "thermal" and t.analog.digital_layers == ("first", "last")


def test_dataclasses_validate_when_built_in_python():
    with pytest.raises(SchemaError, match="bits: 12 is out of range"):
        OperandSpec(bits=(4, 12))
    assert isinstance(SchemaError("k", "p", "f"), ValueError)
