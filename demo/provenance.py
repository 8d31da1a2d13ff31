"""Provenance of a demo run: what its table depends on beyond the config (package versions, torch's
threads, the CPU) and the code it started from (the commit, and whether the code differed from it)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from adpa.demo.stage0 import SERVICE_ENV


def environment() -> dict:
    """What a table depends on beyond the config: package versions, torch's threads and CPU, the commit.

    Runs are deterministic on one machine; another CPU (or thread count, or library version) changes
    floating-point round-off, and with it the trained weights: compare across machines within the
    reported intervals.
    """
    versions = {}
    for package in ("adpa", "torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "numpy",
                    "grpcio", "pydantic"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu: dict = {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count()}
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and "model" not in cpu:
                cpu["model"] = value.strip()
            if key.strip() == "flags":
                cpu["flags"] = value.split()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "service_env": SERVICE_ENV,
        "cpu": cpu,
        **source_state(),
    }


def source_state() -> dict:
    """The commit of the checkout and whether its code (not docs) differed from it: call it when a run
    starts, since a shared working tree can change under a long run."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "*.py", "*.yaml", "*.proto")
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_code_changes": None if changed is None else len(changed.splitlines())}
