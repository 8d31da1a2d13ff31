"""tests/untraced_imports/sitecustomize.py: what is not `adpa` imports untraced, `adpa` traced, and
nothing else about importing changes."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import UNTRACED_IMPORTS

PROBE = r"""
import sys
traced = set()

def tracer(frame, event, arg):
    traced.add(frame.f_code.co_filename)
    return tracer

sys.settrace(tracer)
import fractions, adpa.errors, importlib.machinery, runpy, shadow_probe
runpy.run_module("module_run_as_main", run_name="__main__")
sys.settrace(None)
print("fractions traced:", any(f.endswith("fractions.py") for f in traced))
print("adpa traced:", any(f.endswith("adpa/errors.py") for f in traced))
print("own loader:", type(fractions.__loader__) is importlib.machinery.SourceFileLoader
      and fractions.__spec__.loader is fractions.__loader__)
import builtins
print("shadowed sitecustomize ran:", getattr(builtins, "SHADOWED_RAN", False))
"""


def test_only_adpa_is_traced_while_importing(tmp_path):
    (tmp_path / "shadowed").mkdir()
    (tmp_path / "shadowed" / "sitecustomize.py").write_text("import builtins\nbuiltins.SHADOWED_RAN = True\n")
    (tmp_path / "shadow_probe.py").write_text("")
    (tmp_path / "module_run_as_main.py").write_text("print('ran as', __name__)\n")  # runpy asks the loader's get_code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([UNTRACED_IMPORTS, str(tmp_path / "shadowed"), str(tmp_path)])}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "ran as __main__",
        "fractions traced: False",
        "adpa traced: True",
        "own loader: True",
        "shadowed sitecustomize ran: True",
    ]


def test_without_it_the_probe_sees_everything(tmp_path):
    """The probe can tell: with a plain PYTHONPATH the same import is traced."""
    (tmp_path / "shadow_probe.py").write_text("")
    (tmp_path / "module_run_as_main.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "fractions traced: True" in out.stdout.splitlines()
