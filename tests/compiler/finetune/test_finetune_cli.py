"""`mpqc finetune`: bad input exits 2 with one line; a run killed with SIGKILL resumes and matches an unbroken run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mpqc.cli import main
from mpqc.compiler.capture import capture
from mpqc.compiler.plan import LayerPlan, uniform_plan
from mpqc.compiler.zoo import DigitsCNN


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune_cli")
    torch.manual_seed(0)
    model = DigitsCNN()  # untrained: these tests check the command, not accuracy
    torch.save(model.state_dict(), d / "model.pt")
    cap = capture(model, (torch.randn(1, 1, 8, 8),), fold_bn=True)
    uniform_plan(cap.graph, 4, 4, "null").save(d / "plan.json")
    other = uniform_plan(cap.graph, 4, 4, "null")
    other.layers["conv9"] = LayerPlan(4, 4)
    other.save(d / "other_plan.json")
    (d / "bad.toml").write_text("epochs = = 3\n")
    (d / "unknown.toml").write_text("epoch = 3\n")
    rng = np.random.default_rng(0)
    np.savez(d / "rgb.npz", x=rng.random((40, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    return d


def _args(d, *extra, out="out.pt"):
    return ["finetune", str(d / "model.pt"), "--arch", "mpqc.compiler.zoo:DigitsCNN", "--plan", str(d / "plan.json"),
            "--data", "digits", *extra, "-o", str(d / out) if not os.path.isabs(out) else out]


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


@pytest.mark.parametrize("extra,message", [
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--batch-size", "-4"], "batch_size must be an integer >= 1"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--method", "bogus"], "invalid choice"),
    (["--data", "nowhere"], "unknown data set"),
    (["--plan", "/nonexistent/plan.json"], "not found"),
    (["--config", "bad.toml"], "not valid TOML"),
    (["--config", "unknown.toml"], "unknown config key 'epoch'"),
    (["--config", "missing.toml"], "cannot read it"),
    (["--plan", "other_plan.json"], "model does not have"),
    (["--data", "rgb.npz"], "does not fit the model's input [1, 8, 8] (samples of shape [3, 8, 8]"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v)[:30])
def test_bad_input_exits_2_with_one_line(files, capsys, extra, message):
    extra = [str(files / e) if e.endswith((".toml", "_plan.json")) else f"npz:{files / e}" if e.endswith(".npz")
             else e for e in extra]
    assert _run(_args(files, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_output_that_is_a_directory_exits_2(files, capsys):
    assert _run(_args(files, "--epochs", "1", out=str(files))) == 2
    assert "is a directory" in capsys.readouterr().err


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(files, tmp_path, capsys):
    killed = str(tmp_path / "killed.pt")
    common = ("--epochs", "4", "--seed", "2", "--no-progress")
    ckpt = killed + ".ckpt/last.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mpqc", *_args(files, *common, out=killed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert os.path.exists(ckpt) and not os.path.exists(killed)
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 4

    capsys.readouterr()
    assert _run(_args(files, *common, "--json", out=killed)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"] == done and summary["epochs"] == 4  # at most the epoch in progress was lost

    clean = str(tmp_path / "clean.pt")
    assert _run(_args(files, *common, out=clean)) == 0
    a, b = torch.load(killed, weights_only=True), torch.load(clean, weights_only=True)
    assert a["trained_for"] == b["trained_for"] == {"profile": "ort", "residual_quant": True}
    a, b = a["model"], b["model"]
    assert sorted(a) == sorted(b)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
    assert diff < 1e-4, diff
