"""Print the requirements of pyproject.toml for the images' dependency layer (deploy/Dockerfile).

    python deploy/requirements.py pyproject.toml [EXTRA ...] > requirements.txt

Prints the project's dependencies and those of each EXTRA (e.g. `ray`), one per line, without torch:
the image installs torch before them, from the index of its variant (a CUDA or a CPU build). Reading
pyproject.toml alone (not the source) keeps that layer cached until the dependencies change.
"""

from __future__ import annotations

import re
import sys
import tomllib

SKIP = {"torch"}  # installed first, from the variant's index


def name_of(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement ('ray[serve]>=2.60' -> 'ray')."""
    return re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"requirements.py: unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    wanted = [*project["dependencies"], *(r for e in extras for r in optional[e])]
    return [r for r in dict.fromkeys(wanted) if name_of(r) not in SKIP]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
