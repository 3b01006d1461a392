"""A corpus of bad inputs to `mpqc compile` / `mpqc search`: each gives one clear line (exit 2) or a correct
resume, and nothing half-written is left in OUT. (Model-file corruption cases live in test_loading.py.)"""

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

import mpqc
from mpqc.compiler.zoo import DigitsCNN
from mpqc.errors import InfeasibleError, UserError

ARCH = "mpqc.compiler.zoo:digits_cnn"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    m = DigitsCNN()
    torch.save(m.state_dict(), d / "good.pt")
    data = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 3])
    bad = DigitsCNN()
    bad.fc.weight.data[0, 0] = float("inf")
    torch.save(bad.state_dict(), d / "inf.pt")
    from tests.models import TwoHeadDigits

    torch.save(TwoHeadDigits().state_dict(), d / "twohead.pt")
    rng = np.random.default_rng(0)
    np.savez(d / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    np.savez(d / "noy.npz", x=rng.random((20, 1, 8, 8), dtype=np.float32))
    np.savez(d / "rgb.npz", x=rng.random((40, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    np.savez(d / "labels.npz", x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 20, 40))
    np.savez(d / "neg.npz", x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(-1, 9, 40))
    nan = rng.random((40, 1, 8, 8), dtype=np.float32)
    nan[3, 0, 0, 0] = np.nan
    np.savez(d / "nan.npz", x=nan, y=rng.integers(0, 10, 40))
    np.savez(d / "short.npz", x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 39))
    (d / "bad.toml").write_text('name = "x"\nkind = "digital"\n[weights]\nbits = [1, 99]\n')
    (d / "afile").write_text("not a directory")
    np.savez(d / "objects.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    return d


def compile_(files, out, **kw):
    args = {"model": str(files / "good.pt"), "arch": ARCH, "target": "bitserial", "data": "digits",
            "avg_bits": "W4A4", "out": str(out), "stop_after": "capture"}
    args.update(kw)
    return mpqc.compile(args.pop("model"), **args)


CASES = [
    ({"model": "{d}/truncated.pt"}, "truncated or corrupt"),
    ({"model": "{d}/inf.pt"}, "NaN or Inf"),
    ({"model": "{d}/missing.pt"}, "not found"),
    ({"model": "{d}/twohead.pt", "arch": "tests.models:TwoHeadDigits"}, "returns a tuple of 2; wrap it"),
    ({"target": "tpu9000"}, "tpu9000"),
    ({"target": "{d}/bad.toml"}, "bad.toml"),
    ({"data": "npz:{d}/empty.npz"}, "no samples"),
    ({"data": "npz:{d}/noy.npz"}, "arrays named x and y"),
    ({"data": "npz:{d}/rgb.npz"}, "does not fit the model"),
    ({"data": "npz:{d}/labels.npz"}, "classes"),
    ({"data": "npz:{d}/neg.npz"}, "labels must be >= 0"),
    ({"data": "npz:{d}/nan.npz"}, "NaN or Inf"),
    ({"data": "npz:{d}/short.npz"}, "labels"),
    ({"data": "mnist"}, "unknown data set"),
    ({"data": "digits:extra"}, "digits takes no argument"),
    ({"data": "npz:{d}/objects.npz"}, "holds Python objects"),
    ({"data": "cifar10:{d}/nowhere"}, "directory not found"),
    ({"out": "{d}/afile/out"}, "output directory"),
    ({"stop_after": "lunch"}, "--stop-after"),
    ({"epochs": -1}, "--epochs"),
    ({"target": "analog"}, "--emac"),
    ({"avg_bits": None}, "budget"),
    ({"avg_bits": "W3"}, "avg-bits"),
    ({"avg_bits": None, "compression": "0.5"}, "compression"),
    ({"device": "gpu0"}, "not a torch device"),
    ({"optimizer": "lion"}, "--optimizer"),
    ({"lr": 0.0}, "--lr"),
    ({"search": "annealing"}, "--search"),
    ({"target": "analog", "avg_bits": None, "emac": "10", "search": "learned", "learn_steps": 0}, "--learn-steps"),
    ({"weight_alpha": "half"}, "--weight-alpha"),
    ({"weight_alpha": -1.0}, "--weight-alpha"),
    ({"weight_alpha": "auto", "probe_steps": 0}, "--probe-steps"),
    ({"deploy_tail": 1.0}, "--deploy-tail"),
    ({"deploy_tail": -0.2}, "--deploy-tail"),
    ({"profile": "tensorrt"}, "--profile"),
    ({"finetune_method": "energy"}, "trains an analog array's noise"),
    ({"batch_size": 100000, "stop_after": "finetune"}, "lower --batch-size"),
    ({"lr": 1e12, "epochs": 1, "stop_after": "finetune"}, "lower the learning rate"),
    ({"target": "analog", "avg_bits": None, "emac": "10", "weight_alpha": "auto", "stop_after": "search"},
     "is analog"),
    ({"weight_alpha": "auto", "candidates": "4", "stop_after": "search"}, "one candidate width"),
    ({"batch_size": 0}, "--batch-size"),
    ({"samples": 0}, "--samples"),
    ({"granularity": "channel", "clusters": 0}, "--clusters"),
    ({"pareto": 1}, "--pareto"),
    ({"time_limit": -1.0}, "--time-limit"),
    ({"candidates": "8,0"}, "--candidates"),
    ({"fix": ("conv2=W4B4",)}, "--fix"),
    ({"fix": ("conv2=E100",), "stop_after": "search"}, "fix bits instead"),
    ({"target": "analog", "avg_bits": None, "emac": "10", "fix": ("conv2=W4A4",), "stop_after": "search"},
     "fix the energy per MAC instead"),
]
# errors that need the captured graph or the scores come from their stage, after the stages before it are kept
_AT_A_STAGE = {"is analog", "one candidate width", "fix bits instead", "fix the energy per MAC instead",
               "lower --batch-size", "lower the learning rate"}
if not torch.cuda.is_available():
    CASES.append(({"device": "cuda"}, "no CUDA device"))


@pytest.mark.parametrize("change,words", CASES, ids=[c[1][:20] for c in CASES])
def test_bad_input_is_one_clear_error(files, tmp_path, change, words):
    kw = {k: (v.format(d=files) if isinstance(v, str) else v) for k, v in change.items()}
    out = kw.pop("out", str(tmp_path / "out"))
    with pytest.raises(UserError) as e:
        compile_(files, out, **kw)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    if words not in _AT_A_STAGE:  # checked before anything is written: not even an empty OUT
        assert not os.path.exists(out) or out.startswith(str(files)), os.listdir(out)
    if os.path.isdir(out):
        assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_a_sigterm_mid_write_removes_the_temp_file_and_exits_143(files, tmp_path, monkeypatch, capsys):
    """kill, timeout and job schedulers send SIGTERM; it ends the run like Ctrl-C, so the write in progress
    leaves no temp file behind."""
    from mpqc import cli
    from mpqc.atomic import atomic_write_with
    from mpqc.compiler.plan import Plan

    def save_until_killed(self, path):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write("{")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        atomic_write_with(path, write)

    monkeypatch.setattr(Plan, "save", save_until_killed)
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(["search", str(files / "good.pt"), "--arch", ARCH, "--target", "bitserial", "--avg-bits",
                     "W4A4", "-o", str(tmp_path / "plan.json")])
    assert code == 143
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_budget_below_the_minimum_names_the_smallest_feasible_value(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpqc", "search", str(files / "good.pt"), "--arch", ARCH,
                           "--target", "bitserial", "--bitops", "0.00001", "-o", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mpqc: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr  # warnings may precede the one error line
    err = errors[0]
    assert "--bitops" in err and ("smallest" in err.lower() or "minimum" in err.lower())
    assert not (tmp_path / "p.json").exists()
    assert issubclass(InfeasibleError, UserError)


def test_killed_during_finetuning_resumes(files, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mpqc", "compile", str(files / "good.pt"), "--arch", ARCH, "--target",
            "bitserial", "--avg-bits", "W4A4", "--data", "digits", "--epochs", "8", "--samples", "64", "-o", str(out),
            "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "finetune_ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and any(ckpt.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before its first fine-tuning checkpoint"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model_q.pt").exists()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "finetune" not in manifest["stages"] and "search" in manifest["stages"]
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    res = json.loads(again.stdout)
    assert {"capture", "sensitivity", "search"} <= set(res["reused"])
    info = json.loads((out / "manifest.json").read_text())["stages"]["finetune"]["info"]
    assert info["resumed_from"] and info["resumed_from"] >= 1
    assert (out / "report.html").exists()


def test_demo_refuses_a_file_for_its_folder_and_negative_epochs_before_training(files, tmp_path, capsys):
    from mpqc import cli

    assert cli.main(["demo", "-o", str(files / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["demo", "-o", str(tmp_path / "demo"), "--epochs", "-1"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
