"""`mpqc compile --config FILE` and the OUTDIR/compile.toml every compile writes (compiler/options_file.py,
mpqc/commands/config_file.py): the file repeats the compile, the command line overrides the file, and a bad
file is one line, exit 2, before anything is written."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.cli import main
from mpqc.compiler.options_file import options_toml, toml_value
from mpqc.compiler.pipeline import CompileOptions

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ARCH = "mpqc.compiler.zoo:digits_cnn"


@pytest.fixture
def model(digits_cnn_file):
    return digits_cnn_file


def _toml(path, text: str):
    path.write_text(text)
    return str(path)


scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False), st.text())


@settings(max_examples=200, deadline=None)
@given(st.one_of(scalars, st.lists(st.text(), max_size=4)))
def test_every_value_a_compile_writes_reads_back_as_itself(v):
    back = tomllib.loads(f"x = {toml_value(v)}")["x"]
    if isinstance(v, float) and math.isinf(v):
        assert back == v
    else:
        assert back == v and type(back) is type(v)


def test_the_written_options_cover_every_field_but_the_invocations_own():
    o = CompileOptions(model="m.pt", target="generic", data="digits", out="o", avg_bits="W3A3", fix=("conv1=8",),
                       weight_alpha="auto", stop_after="search")
    text = tomllib.loads(options_toml(o))
    assert text["avg-bits"] == "W3A3" and text["fix"] == ["conv1=8"] and text["weight-alpha"] == "auto"
    assert text["output"] == "o" and "stop-after" not in text and "progress" not in text
    assert "bitops" not in text  # None is not written


def test_a_compiles_written_options_repeat_it_stage_for_stage(model, tmp_path, capsys, monkeypatch):
    """The compile.toml a compile writes, given back with --config, is the same compile: every stage reused."""
    monkeypatch.chdir(tmp_path)
    args = ["compile", str(model), "--arch", ARCH, "--target", "bitserial", "--avg-bits", "W3A4", "--data",
            "digits", "-o", "out", "--granularity", "channel", "--weight-alpha", "0.4", "--fix", "conv1=W8A8",
            "--no-monotone", "--samples", "64", "--stop-after", "search", "--json"]
    assert main(args) == 0
    capsys.readouterr()
    written = tomllib.loads((tmp_path / "out" / "compile.toml").read_text())
    assert written["granularity"] == "channel" and written["monotone"] is False and written["samples"] == 64
    assert main(["compile", "--config", "out/compile.toml", "--stop-after", "search", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == ["capture", "sensitivity", "search"]
    # and one option changed on the command line redoes what depends on it, nothing before it
    assert main(["compile", "--config", "out/compile.toml", "--weight-alpha", "1", "--stop-after", "search",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == ["capture", "sensitivity"]


def test_the_command_line_overrides_the_file_and_the_file_the_defaults(model, tmp_path, capsys):
    cfg = _toml(tmp_path / "c.toml", f"""
model = "{model}"
arch = "{ARCH}"
target = "bitserial"
data = "digits"
output = "{tmp_path / 'out'}"
[budgets]
avg-bits = "W4A4"
[finetune]
epochs = 5
lr = 0.05
residual-quant = false
""")
    # --epochs 3 is the default, typed out: it still beats the file's 5
    assert main(["compile", "--config", cfg, "--epochs", "3", "--target", "generic", "--stop-after", "capture",
                 "--json"]) == 0
    capsys.readouterr()
    used = tomllib.loads((tmp_path / "out" / "compile.toml").read_text())
    assert used["epochs"] == 3 and used["target"] == "generic"  # the command line
    assert used["lr"] == 0.05 and used["residual-quant"] is False and used["avg-bits"] == "W4A4"  # the file
    assert used["optimizer"] == "sgd" and used["batch-size"] == 64  # the defaults


BAD = [
    ('avg_bits = "W4A4"', "unknown key 'avg_bits'; did you mean 'avg-bits'?"),
    ("[finetune]\nepoch = 3", "unknown key 'finetune.epoch'; did you mean 'epochs'?"),
    ("epochs = 2.5", "epochs = 2.5: expected an integer"),
    ('solver = "gurobi"', 'solver = "gurobi": choose one of highs, highs-mip, cbc'),
    ('monotone = "yes"', 'monotone = "yes": expected true or false'),
    ("weight-alpha = -1", "weight-alpha = -1: -1.0 must be a finite number >= 0 or auto"),
    ("fix = [8]", "fix = [8]: expected a list of strings"),
    ("epochs = [3]", "epochs = [3]: expected one value"),
    ("epochs = 3\n[finetune]\nepochs = 4", "finetune.epochs repeats epochs"),
    ("epochs = ", "not valid TOML"),
]


@pytest.mark.parametrize("text,said", BAD, ids=[b[1][:30] for b in BAD])
def test_a_bad_config_is_one_line_and_exit_2_before_anything_is_written(model, tmp_path, capsys, text, said):
    cfg = _toml(tmp_path / "bad.toml", text)
    out = tmp_path / "out"
    code = main(["compile", str(model), "--arch", ARCH, "--target", "bitserial", "--avg-bits", "W4A4", "--data",
                 "digits", "-o", str(out), "--config", cfg])
    err = capsys.readouterr().err
    assert code == 2 and said in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--config {cfg}" in err and not out.exists()


def test_the_required_options_may_come_from_either_place_but_must_come(model, tmp_path, capsys):
    cfg = _toml(tmp_path / "c.toml", f'model = "{model}"\narch = "{ARCH}"\ntarget = "bitserial"\n')
    assert main(["compile", "--config", cfg, "--avg-bits", "W4A4", "-o", str(tmp_path / "out")]) == 2
    assert "--data is missing: give it on the command line or as data = ... in --config" in capsys.readouterr().err
    assert main(["compile", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err
    assert main(["compile", "--target", "bitserial"]) == 2  # no file at all: MODEL is still required
    assert "MODEL is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
