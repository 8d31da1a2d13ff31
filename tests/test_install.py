"""The install path: pip's configured package sources handed to uv (scripts/pip_to_uv.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pip_to_uv", ROOT / "scripts" / "pip_to_uv.py")
pip_to_uv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_to_uv)


def test_pips_sources_become_uv_flags():
    lines = [
        ":env:.find-links='/opt/env-wheels'",
        "global.cert='/etc/ssl/certs/ca.crt'",
        "global.constraint='/etc/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.find-links='/opt/wheels'",
        "user.timeout='60'",
    ]
    flags = pip_to_uv.uv_flags(lines)
    pairs = list(zip(flags[::2], flags[1::2]))
    # the environment variable wins over the file, as it does for pip; options uv has no use for are left out
    assert ("--find-links", "/opt/env-wheels") in pairs and ("--find-links", "/opt/wheels") not in pairs
    assert ("--constraint", "/etc/pip/constraints.txt") in pairs
    assert [v for k, v in pairs if k == "--extra-index-url"] == ["file:///opt/a/simple", "file:///opt/b/simple"]
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip takes the best version from any index
    assert not any("cert" in f or "timeout" in f or "60" == f for f in flags)


def test_no_pip_configuration_gives_no_flags():
    assert pip_to_uv.uv_flags([]) == []
    assert pip_to_uv.uv_flags(["global.find-links='/opt/wheels'"]) == ["--find-links", "/opt/wheels"]


def test_the_script_reads_this_machines_pip_configuration():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "pip_to_uv.py")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout.splitlines()
    assert run.stdout.split() == pip_to_uv.uv_flags(config)
