"""Padded token batches and teacher signals laid out on the student's logits positions.

Position t of a sequence is the distribution of token t + 1 (the student's logits[:, t]). A
response occupying tokens [p, L) is scored at positions [p - 1, L - 1): the same ranges the
teacher service takes, so its answer rows drop straight into (B, T, ...) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adpa.protocol import ScoreResult


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): token t + 1, the label of position t (0 where unscored)
    mask: torch.Tensor  # (B, T) bool: scored (response) positions
    ranges: list[tuple[int, int]]  # per sequence, [p - 1, L - 1)

    @property
    def sequences(self) -> list[torch.Tensor]:
        lengths = self.attention_mask.sum(-1).tolist()
        return [ids[:n] for ids, n in zip(self.input_ids, lengths)]

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device), self.mask.to(device),
            self.ranges,
        )


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0) -> TokenBatch:
    """Right-pad prompt + response pairs; only response tokens are scored."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    targets = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    ranges = []
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt or not response:
            raise ValueError(f"sequence {b}: prompt and response must both be non-empty")
        ids = torch.tensor(prompt + response, dtype=torch.long)
        input_ids[b, : len(ids)] = ids
        attention_mask[b, : len(ids)] = 1
        start, end = len(prompt) - 1, len(ids) - 1
        targets[b, start:end] = ids[start + 1 : end + 1]
        mask[b, start:end] = True
        ranges.append((start, end))
    return TokenBatch(input_ids, attention_mask, targets, mask, ranges)


def place_rows(rows: torch.Tensor, ranges: list[tuple[int, int]], width: int, fill: float) -> torch.Tensor:
    """(P, ...) rows in request order -> (B, width, ...), filling unscored positions with `fill`."""
    out = torch.full((len(ranges), width, *rows.shape[1:]), fill, dtype=rows.dtype)
    row = 0
    for b, (start, end) in enumerate(ranges):
        out[b, start:end] = rows[row : row + end - start]
        row += end - start
    if row != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows for {row} scored positions")
    return out


@dataclass
class TeacherSignals:
    """A teacher answer on the student's (B, T) grid."""

    signal: str
    indices: torch.Tensor | None  # (B, T, m), -1 pads; None for dense
    values: torch.Tensor  # (B, T, m) or (B, T, V)
    tail: torch.Tensor | None  # (B, T)
    logprobs: torch.Tensor | None = None  # (B, T, m): pi_dpo on the support (advantage + include_logprobs)
    reference_logprobs: torch.Tensor | None = None  # (B, T, m): pi_ref on the support
    weights: torch.Tensor | None = None  # (B, T, n): importance weights of a sampled support

    @classmethod
    def from_result(cls, result: ScoreResult, batch: TokenBatch) -> TeacherSignals:
        width = batch.input_ids.shape[1]

        def grid(rows: torch.Tensor | None, fill: float) -> torch.Tensor | None:
            return None if rows is None else place_rows(rows, batch.ranges, width, fill)

        return cls(
            signal=result.signal,
            indices=grid(result.indices, -1),
            values=grid(result.values, 0.0),
            tail=grid(result.tail, 0.0),
            logprobs=grid(result.extras.get("logprobs"), 0.0),
            reference_logprobs=grid(result.extras.get("reference_logprobs"), 0.0),
            weights=grid(result.weights, 0.0),
        )

    def to(self, device: torch.device | str) -> TeacherSignals:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherSignals(
            self.signal, move(self.indices), move(self.values), move(self.tail), move(self.logprobs),
            move(self.reference_logprobs), move(self.weights),
        )
