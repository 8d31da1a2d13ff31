"""Where a teacher gets pi_ref: the `ReferenceModel` protocol, and the in-process implementation.

A teacher asks its reference for log-probs at exactly the token ids its own answer needs. The
reference may be an engine in the same process (`LocalReference`), a reference service over gRPC
(`adpa.services.remote_reference.RemoteReference`), or a Ray Serve deployment
(`adpa.services.ray`); the teacher only sees this protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch

from adpa import sparse
from adpa.protocol import ModelFingerprint, SupportSpec, SupportValues
from adpa.services.batching import StopFn
from adpa.services.engine import ScoringEngine


class ReferenceModel(Protocol):
    @property
    def fingerprint(self) -> ModelFingerprint: ...

    def score(
        self, sequences: list[torch.Tensor], ranges: list[tuple[int, int]], support: SupportSpec,
        should_stop: StopFn | None = None, caller: str = "", deadline: float | None = None,
    ) -> SupportValues:
        """log pi_ref on `support` at the scored positions (INDICES with k=0, or DENSE).

        `deadline` is the caller's `time.monotonic()` instant: a remote reference is given only
        what is left of it, and a reference that runs out of it raises `DeadlineExceeded` (the
        caller's own deadline passed: retrying the same request would miss it again)."""

    def max_indices(self) -> int | None:
        """The widest INDICES support it accepts per position; None when unbounded."""

    def ready(self) -> bool:
        """Whether it answers now (a remote reference may be down)."""

    def close(self) -> None: ...


class LocalReference:
    """pi_ref in the same process: one more forward, no transfer."""

    def __init__(self, engine: ScoringEngine):
        self.engine = engine

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.engine.fingerprint

    def score(self, sequences, ranges, support, should_stop=None, caller="", deadline=None) -> SupportValues:
        # In process, `should_stop` already polls the deadline between micro-batches.
        return self.engine.score(sequences, ranges, support, should_stop, caller)

    def max_indices(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def reference_at(
    reference: ReferenceModel,
    sequences: list[torch.Tensor],
    ranges: list[tuple[int, int]],
    indices: torch.Tensor | None,
    should_stop: StopFn | None = None,
    caller: str = "",
    deadline: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_ref at `indices` (P, m) (or everywhere when None), and its log tail mass outside them."""
    if indices is None:
        dense = reference.score(sequences, ranges, SupportSpec("dense"), should_stop, caller, deadline)
        return dense.logprobs, None
    # Ask for each distinct id once (sampled supports repeat ids), then read them back in order.
    unique = sparse.sorted_union(indices, indices[:, :0], reference.fingerprint.vocab_size)
    answer = reference.score(
        sequences, ranges, SupportSpec("indices", k=0, indices=unique), should_stop, caller, deadline
    )
    return sparse.lookup(answer.indices, answer.logprobs, indices), answer.log_tail
