"""The fixed top-level folders resolve as mpqc.* in an editable install and in a built wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["mpqc.compiler", "mpqc.kernels", "mpqc.cost_models", "mpqc.targets"]


def test_installed_names_resolve_to_the_repo_folders():
    code = "import importlib,sys;print('\\n'.join(importlib.import_module(n).__file__ for n in sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, *NAMES], capture_output=True, text=True, cwd="/",
                         check=True).stdout.split()
    for name, path in zip(NAMES, out):
        assert Path(path).parent == ROOT / name.split(".")[1], (name, path)


def test_wheel_contains_every_package_and_the_builtin_targets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mpqc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for n in NAMES + ["mpqc.commands"]:
        assert f"{n.replace('.', '/')}/__init__.py" in names
    assert "mpqc/targets/generic.toml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # -S: no .pth files, so the editable finder is not installed; site-packages only for torch and friends
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (f"import sys; sys.path[:0] = [{str(target)!r}]; sys.path.append({site!r}); import importlib; "
            "[print(importlib.import_module(n).__file__) for n in sys.argv[1:]]")
    out = subprocess.run([sys.executable, "-S", "-c", code, *NAMES], capture_output=True, text=True, cwd="/",
                         check=True).stdout.split()
    assert all(p.startswith(str(target)) for p in out), out


def test_import_mpqc_is_lean():
    code = "import sys, mpqc; print(any(m in sys.modules for m in ('torch', 'triton')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
