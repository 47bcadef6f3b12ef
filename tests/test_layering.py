"""Package layering: policies/ and envs/ never import genrl; envs/ never imports policies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level packages it must not import
FORBIDDEN: dict[str, set[str]] = {  # folder -> import names it must not use (installed as genrl_<folder>)
    "policies": {"genrl", "genrl_envs", "envs"},
    "envs": {"genrl", "genrl_policies", "policies"},
}


def imported_top_levels(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file, nested ones included."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_helper_sees_imports() -> None:
    # guard against a helper that silently finds nothing
    src = ROOT / "policies" / "gaussian.py"
    found = {name for _, name in imported_top_levels(src)}
    assert {"torch", "genrl_policies"} <= found
    fake = "import os\nimport genrl.losses as L\ndef f():\n    from genrl_policies.base import record_map\nfrom . import x\n"
    assert imported_top_levels(src, fake) == [(1, "os"), (2, "genrl"), (4, "genrl_policies")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upper_layers(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no .py files under {package}/"
    assert (ROOT / package / "__init__.py") in files
    violations = [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in files for line, name in imported_top_levels(f) if name in FORBIDDEN[package]]
    assert not violations, "\n".join(violations)


def test_installed_import_names_do_not_claim_generic_top_levels(tmp_path: Path) -> None:
    """A user's own envs/ or policies/ package next to their script keeps working with genrl."""
    import subprocess
    import sys

    for name in ("envs", "policies"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("MINE = True\n")
    code = "import envs, policies, genrl.trainer, genrl_envs, genrl_policies; assert envs.MINE and policies.MINE"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
