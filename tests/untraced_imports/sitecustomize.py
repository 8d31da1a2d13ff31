"""Imports of modules outside `adpa` run untraced in the processes the suite measures.

tests/conftest.py puts this folder first on the PYTHONPATH of every process the suite starts.
Coverage starts before this file runs (its .pth file comes first) and traces every Python line of
the process, measured or not: importing torch and transformers under its tracer took 5.1 s of CPU
instead of 3.8 s, in each of the dozens of servers, trainers and workers a run starts. Only `adpa`
is measured, so the finder below turns the tracer off while any other module executes its import
and back on after; what those imports run of `adpa` is nothing (a run measures the same lines and
branches with it as without). Without a tracer (no coverage, or Python's sys.monitoring) it does
nothing.
"""

import importlib.machinery
import importlib.util
import os
import sys


class _UntracedLoader:
    """The module's own loader, run with this thread's tracer off."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_code, get_source, is_package...: as the module's own loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # the module sees its own loader
        tracer = sys.gettrace()
        sys.settrace(None)
        try:
            self.loader.exec_module(module)
        finally:
            sys.settrace(tracer)


class _UntracedImports:
    """Finds a module as the finders after it would, and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "adpa" or sys.gettrace() is None:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _UntracedLoader(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _UntracedImports())

# A sitecustomize this one shadows (a distribution's, a virtualenv's) still runs.
_here = os.path.dirname(os.path.abspath(__file__))
_shadowed = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
)
if _shadowed is not None and _shadowed.loader is not None:
    _shadowed.loader.exec_module(importlib.util.module_from_spec(_shadowed))
