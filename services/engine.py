"""The scoring engine: an HF causal LM -> fp32 log-probs on a support, at requested positions only.

The model body runs once per micro-batch; the output head and the fp32 log-softmax run only on
the hidden states of scored positions, a chunk of rows at a time, so no fp32 (positions, V)
block larger than `logits_budget_bytes` is built (dense answers excepted: they are the answer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adpa import sparse
from adpa.errors import Cancelled
from adpa.fingerprint import model_fingerprint, tokenizer_fingerprint
from adpa.protocol import ModelFingerprint, SupportSpec, SupportValues

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and runs fast on GPUs; CPUs run fp32 fastest.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


class ScoringEngine:
    """Scores token sequences with one causal LM. Thread-safe: one forward runs at a time."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        model_hash: str,
        max_seq_len: int | None = None,
        max_batch_tokens: int = 8192,
        logits_budget_bytes: int = 64 << 20,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_batch_tokens = max_batch_tokens
        self.rows_per_chunk = max(1, logits_budget_bytes // (4 * self.vocab_size))
        self.max_seq_len = max_seq_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.fingerprint = ModelFingerprint(
            model_name=name,
            model_hash=model_hash,
            tokenizer_hash=tokenizer_fingerprint(tokenizer),
            vocab_size=self.vocab_size,
            dtype=str(model.dtype).removeprefix("torch."),
            max_seq_len=self.max_seq_len,
        )
        self._lock = threading.Lock()
        self._head_only = self._head_path_matches()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> ScoringEngine:
        """Load a model and its tokenizer (local folder, or hub id where a hub is reachable)."""
        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype, dev),
            revision=revision,
            trust_remote_code=trust_remote_code,
        ).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        commit = getattr(model.config, "_commit_hash", None) or revision
        return cls(model, tokenizer, name=name_or_path, model_hash=model_fingerprint(name_or_path, commit), **kwargs)

    # -- the forward --------------------------------------------------------------------------

    def _head_path_matches(self) -> bool:
        """Check once that body + output head reproduces the model's logits.

        Models that post-process logits in ways this engine does not know (scaling, capping)
        fall back to the full forward, which is exact but builds (batch, T, V) logits.
        """
        ids = torch.arange(min(8, self.vocab_size), device=self.device)[None] % self.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=ids).logits.float()
            mask = torch.ones_like(ids)
            head = self._logits(self._body(ids, mask)[0])
        if torch.allclose(full[0], head, atol=1e-3, rtol=1e-3):
            return True
        logger.warning("output head path does not reproduce the model's logits; using full forward")
        return False

    def _body(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) final hidden states."""
        return self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, H) hidden states -> (R, V) fp32 logits."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def _features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, F): hidden states, or logits when the head path cannot be used."""
        if self._head_only:
            return self._body(ids, mask)
        return self.model(input_ids=ids, attention_mask=mask).logits

    def _log_softmax(self, features: torch.Tensor) -> torch.Tensor:
        logits = self._logits(features) if self._head_only else features.float()
        return logits.log_softmax(-1)

    def _micro_batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Groups of sequence indices, longest first, with at most max_batch_tokens padded tokens."""
        group: list[int] = []
        for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            if group and (len(group) + 1) * lengths[group[0]] > self.max_batch_tokens:
                yield group
                group = []
            group.append(b)
        if group:
            yield group

    def _scored_rows(
        self, sequences: list[torch.Tensor], ranges: list[tuple[int, int]], should_stop: Callable[[], bool] | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (rows, logp): global row ids (R,) and their fp32 log-softmax (R, V), chunk by chunk."""
        offsets = [0]
        for start, end in ranges:
            offsets.append(offsets[-1] + end - start)
        for group in self._micro_batches([len(s) for s in sequences]):
            if should_stop is not None and should_stop():
                raise Cancelled("request cancelled or past its deadline")
            width = len(sequences[group[0]])
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, b in enumerate(group):
                ids[row, : len(sequences[b])] = sequences[b]
                mask[row, : len(sequences[b])] = 1
            features = self._features(ids.to(self.device), mask.to(self.device))  # (b, T, F)
            picked = torch.cat([features[row, slice(*ranges[b])] for row, b in enumerate(group)])  # (R, F)
            rows = torch.cat([torch.arange(offsets[b], offsets[b + 1]) for b in group])  # (R,)
            for i in range(0, len(rows), self.rows_per_chunk):
                chunk = slice(i, i + self.rows_per_chunk)
                yield rows[chunk], self._log_softmax(picked[chunk]).cpu()

    # -- the public call ----------------------------------------------------------------------

    def score(
        self,
        sequences: list[torch.Tensor],
        ranges: list[tuple[int, int]],
        support: SupportSpec,
        should_stop: Callable[[], bool] | None = None,
    ) -> SupportValues:
        """Log-probs on `support` at every scored position, rows in request order.

        `sequences` and `ranges` must already be validated (ids in the vocabulary, ranges inside
        their sequence); `should_stop` is polled between micro-batches.
        """
        num_rows = sum(end - start for start, end in ranges)
        uniforms = None
        if support.kind == "sampled":
            # Drawn up front in request order: the draws don't depend on batching or chunking.
            generator = torch.Generator().manual_seed(support.seed)
            uniforms = torch.rand((num_rows, support.n), generator=generator)

        parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
        with self._lock, torch.inference_mode():
            for rows, logp in self._scored_rows(sequences, ranges, should_stop):
                if support.kind == "topk":
                    out = sparse.topk(logp, support.k)
                elif support.kind == "indices":
                    out = sparse.union_with_topk(logp, support.indices[rows], support.k)
                elif support.kind == "sampled":
                    out = sparse.sample(logp, uniforms[rows], support.temperature)
                elif support.kind == "dense":
                    out = (logp,)
                else:
                    raise ValueError(f"unknown support kind {support.kind!r}")
                parts.append((rows, out))
        return _assemble(support.kind, num_rows, parts)


def _assemble(
    kind: str, num_rows: int, parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
) -> SupportValues:
    """Put chunk results back in request order; rows of unequal support width pad with -1 / 0."""

    def place(j: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
        blocks = [(rows, out[j].to(dtype)) for rows, out in parts]
        if blocks[0][1].dim() == 1:
            full = torch.full((num_rows,), fill, dtype=dtype)
            for rows, block in blocks:
                full[rows] = block
            return full
        full = torch.full((num_rows, max(block.shape[1] for _, block in blocks)), fill, dtype=dtype)
        for rows, block in blocks:
            full[rows, : block.shape[1]] = block
        return full

    if kind == "dense":
        return SupportValues(indices=None, logprobs=place(0, 0.0, torch.float32), log_tail=None)
    indices = place(0, sparse.PAD, torch.long)
    values = place(1, 0.0, torch.float32)
    if kind == "sampled":
        return SupportValues(indices=indices, logprobs=values, log_tail=None, weights=place(2, 0.0, torch.float32))
    return SupportValues(indices=indices, logprobs=values, log_tail=place(2, 0.0, torch.float32))
