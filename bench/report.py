"""How every benchmark hands its result over: the JSON document to a file (--out) or to stdout."""

from __future__ import annotations

import json
from pathlib import Path


def emit(doc: dict, out: str | None) -> int:
    """Write `doc` as indented JSON to `out`, or print it when `out` is None; the exit status (0)."""
    text = json.dumps(doc, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)
    return 0
