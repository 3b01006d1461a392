"""Dependencies point one way (DESIGN.md): kernels import nothing of mpqc, cost models and targets never
import the compiler, the compiler never imports the CLI. Checked on the source, so a wrong-way import fails CI.

(import-linter cannot see the package-dir mapping of mpqc.*, so the contract is checked here directly.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER_MODULE = {"kernels": "mpqc.kernels", "cost_models": "mpqc.cost_models", "targets": "mpqc.targets",
                 "compiler": "mpqc.compiler", "mpqc": "mpqc"}
FORBIDDEN = {
    "kernels": ("mpqc",),
    "cost_models": ("mpqc.compiler", "mpqc.cli", "mpqc.commands"),
    "targets": ("mpqc.compiler", "mpqc.cli", "mpqc.commands"),
    "compiler": ("mpqc.cli", "mpqc.commands"),
}


def imports_of(path: Path, package: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                out.append(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.append(node.module)
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_one_way(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        rel = path.relative_to(ROOT / folder).with_suffix("")
        package = ".".join([FOLDER_MODULE[folder], *rel.parts[:-1]])
        for name in imports_of(path, package):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder]):
                if folder != "kernels" or not name.startswith("mpqc.kernels"):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_wrong_way_import(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("from mpqc.compiler import ir\nfrom . import y\n")
    assert imports_of(p, "mpqc.cost_models") == ["mpqc.compiler", "mpqc.cost_models"]
