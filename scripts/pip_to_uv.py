"""Print pip's configured package sources as `uv pip install` flags, one per line.

uv does not read pip's configuration (pip.conf, PIP_* variables). Where a machine finds its wheels
through it (a local find-links folder with the CPU torch wheel, a mirror, a constraints file), an
install through uv must be given the same sources, or it resolves other wheels (for torch: the
multi-GB CUDA build). Reads `python -m pip config list`, which merges every file and variable.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip option -> the uv flag that means the same; every value may be a space-separated list.
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def uv_flags(config_lines: list[str]) -> list[str]:
    """`global.find-links='/opt/wheels'` -> ["--find-links", "/opt/wheels"]."""
    values: dict[str, list[str]] = {}
    # Environment variables (`:env:.` lines) override the files, as they do for pip.
    for line in sorted(config_lines, key=lambda line: line.startswith(":env:")):
        key, _, raw = line.partition("=")
        option = key.rpartition(".")[2]
        if option in FLAGS and raw:
            values[option] = " ".join(shlex.split(raw)).split()  # quoted or not, a space-separated list
    flags = [item for option, items in values.items() for value in items for item in (FLAGS[option], value)]
    if values.keys() & {"index-url", "extra-index-url"}:
        flags += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version from any index
    return flags


def main() -> int:
    lines = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    print("\n".join(uv_flags(lines)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
