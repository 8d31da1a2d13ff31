"""`python tests/children_unmeasured.py MODULE ARGS...`: run MODULE as `python -m MODULE ARGS...` would,
measured by coverage when the suite measures subprocesses, but with the processes it starts left
unmeasured (see conftest.children_unmeasured: for `adpa serve --ray`, those are Ray's)."""

import os
import runpy
import sys

# Coverage has started in this process already (its .pth file runs at interpreter start-up).
os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
