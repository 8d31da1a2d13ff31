"""Fingerprints of models and tokenizers, so signals from different model versions never mix.

Both sides compute the tokenizer fingerprint with this one function: the server for the model it
serves, the client for the student's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE_BYTES = 4 << 20  # head and tail of each weight file: enough to tell checkpoints apart


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 (16 hex digits) of the vocabulary, the special token ids and the chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id,
            "all": sorted(tokenizer.all_special_ids),
        },
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """sha256 (16 hex digits) identifying a checkpoint.

    For a local folder: its config plus each weight file's name, size, and first and last 4 MiB
    (hashing all of a 16 GB checkpoint at every start would cost minutes). For a hub id: the
    resolved commit, when known.
    """
    digest = hashlib.sha256()
    path = Path(name_or_path)
    if not path.is_dir():
        digest.update(f"{name_or_path}@{revision or 'unknown'}".encode())
        return digest.hexdigest()[:16]
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    for file in sorted(p for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                fh.seek(size - _SAMPLE_BYTES, os.SEEK_SET)
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]
