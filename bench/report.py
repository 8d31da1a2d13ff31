"""What every benchmark shares: its parser (the docstring's first paragraph, --out), its table's lines
on stderr, and its JSON document, to a file (--out) or to stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def benchmark_parser(doc: str, *, show_defaults: bool = True) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first paragraph of its module docstring `doc`."""
    if show_defaults:
        return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_out(parser: argparse.ArgumentParser) -> None:
    """--out: where `emit` writes the JSON (default: stdout)."""
    parser.add_argument("--out", help="write the JSON here instead of stdout")


def comma_choices(value: str, choices: tuple[str, ...], flag: str) -> list[str]:
    """The comma-separated `value` of `flag` as a list; exits naming any value not in `choices`."""
    values = value.split(",")
    unknown = sorted(set(values) - set(choices))
    if unknown:
        raise SystemExit(f"unknown {flag} value(s): {unknown}; expected some of {list(choices)}")
    return values


def table_line(line: str = "") -> None:
    """One line of a benchmark's table: on stderr, so that stdout holds only the JSON."""
    print(line, file=sys.stderr)


def emit(doc: dict, out: str | None) -> int:
    """Write `doc` as indented JSON to `out`, or print it when `out` is None; the exit status (0)."""
    text = json.dumps(doc, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)
    return 0
