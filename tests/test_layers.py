"""The import layers of docs/architecture.md, checked with import-linter on the real sources.

The folders map to one `adpa` namespace through setuptools' package-dir (services/ is
adpa.services, ...), which import-linter cannot follow, so the check runs on a copy laid out as
the installed package is. The contracts live in pyproject.toml ([tool.importlinter]).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def materialize(dest: Path) -> Path:
    """Copy the sources into dest/adpa/... as they are installed; return dest."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*package.split("."))
        source = ROOT / folder
        if package == "adpa":  # the contract modules only; the other packages are mapped separately
            target.mkdir(parents=True, exist_ok=True)
            for file in source.glob("*.py"):
                shutil.copy(file, target / file.name)
        else:
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", "pyproject.toml", "--no-cache"], cwd=tree, capture_output=True, text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=300,
    )


def test_layers_hold(tmp_path):
    result = lint_imports(materialize(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, bad_import, broken",
    [
        ("client/teacher.py", "import adpa.services.engine", "The client is light"),
        ("client/teacher.py", "import fastapi", "The client is light"),
        ("services/scoring.py", "import adpa.training.losses", "Layers"),
        ("adpa/protocol.py", "import adpa.client", "Layers"),
        ("services/grpc/servicer.py", "import adpa.services.http.app", "Transports are independent"),
        ("services/ray/app.py", "import adpa.services.grpc.interceptors", "Transports are independent"),
        ("services/engine.py", "import adpa.services.frontend", "Inside services"),
        ("services/frontend.py", "import adpa.services.grpc.servicer", "Inside services"),
    ],
)
def test_a_broken_layer_is_caught(tmp_path, module, bad_import, broken):
    tree = materialize(tmp_path)
    package, _, name = module.partition("/")
    folder = {"client": "adpa/client", "services": "adpa/services", "adpa": "adpa"}[package]
    path = tree / folder / name
    path.write_text(path.read_text() + f"\n{bad_import}  # a deliberate violation\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_importing_the_client_loads_no_server_code():
    code = (
        "import sys, adpa.client; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'adpa.services', 'adpa.services.engine', 'adpa.training') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
