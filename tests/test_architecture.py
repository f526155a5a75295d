"""Rules of the code's shape that no linter checks: module size, test helpers, packaging.

The import layers themselves are checked by import-linter (contracts in pyproject.toml, run by
.ci/run); ruff checks complexity, blind excepts and relative imports.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lora_trainer"
MAX_LINES = 600
LONG_MARKER = "# long-module:"


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_long_modules_say_why():
    """A module over 600 lines carries a ``# long-module: <reason>`` line near its top."""
    unexplained = []
    for path in _python_files(PACKAGE):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith(LONG_MARKER) for line in lines[:40]):
            unexplained.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert not unexplained, f"split these modules or add '{LONG_MARKER} <reason>' at the top: {unexplained}"


def test_test_modules_import_no_other_test_module():
    """Shared helpers live under tests/fixtures/, so a test file never imports another test file."""
    offenders = []
    for path in _python_files(ROOT / "tests"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not offenders, f"move the shared helpers to tests/fixtures/: {offenders}"


@pytest.mark.slow
def test_built_wheel_holds_every_subpackage_and_the_presets(tmp_path):
    """``pip wheel .`` packages every subpackage and the built-in presets, and the installed copy
    imports and lists its presets (nothing read from the source tree)."""
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    packages = sorted({str(p.parent.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")})
    missing = [pkg for pkg in packages if f"{pkg}/__init__.py" not in names]
    assert not missing, f"subpackages left out of the wheel: {missing}"
    presets = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.toml"))
    assert presets, "no preset files found in the source tree"
    assert set(presets) <= names, f"presets left out of the wheel: {sorted(set(presets) - names)}"

    code = (
        "import sys, lora_trainer, lora_trainer.config as c;"
        "assert lora_trainer.__file__.startswith(sys.argv[1]), lora_trainer.__file__;"
        "print(','.join(c.list_presets()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "site")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "kohya-trainer" in run.stdout.split(",")
