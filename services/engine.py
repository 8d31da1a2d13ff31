"""The scoring engine: an HF causal LM -> fp32 log-probs on a support, at requested positions only.

The model body runs once per micro-batch; the output head and the fp32 log-softmax run only on
the hidden states of scored positions, a chunk of rows at a time, so no fp32 (positions, V)
block larger than `logits_budget_bytes` is built (dense answers excepted: they are the answer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adpa import sparse
from adpa.fingerprint import model_fingerprint, tokenizer_fingerprint
from adpa.protocol import ModelFingerprint, SupportSpec, SupportValues
from adpa.services.batching import Item, Job, Scheduler

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
    """Scores token sequences with one causal LM. Thread-safe: one forward runs at a time, and
    with `batching` the sequences of concurrent calls share forwards (see `batching.py`)."""

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
        batching: bool = True,
        batch_wait_s: float = 0.0,
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
        self._head_only = self._head_path_matches()
        self.scheduler = Scheduler(
            self._forward, max_batch_tokens=max_batch_tokens, batching=batching, wait_s=batch_wait_s,
            name=f"adpa-batcher-{name}",
        )

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

    def _forward(self, group: list[Item]) -> None:
        """One micro-batch: the body once over the padded sequences, then the head and an fp32
        log-softmax on the scored rows only, a chunk of rows at a time; each chunk's rows go back
        to the job they belong to (`Job.add`), where the job's support is taken."""
        width = max(item.length for item in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, item in enumerate(group):
            ids[row, : item.length] = item.job.sequences[item.index]
            mask[row, : item.length] = 1
        with torch.inference_mode():
            features = self._features(ids.to(self.device), mask.to(self.device))  # (b, T, F)
            owners = []  # (item, first row in `picked`, rows)
            picked = []
            offset = 0
            for row, item in enumerate(group):
                start, end = item.job.ranges[item.index]
                picked.append(features[row, start:end])
                owners.append((item, offset, end - start))
                offset += end - start
            picked = torch.cat(picked)  # (R, F)
            for c0 in range(0, offset, self.rows_per_chunk):
                c1 = min(c0 + self.rows_per_chunk, offset)
                logp = self._log_softmax(picked[c0:c1]).cpu()  # (c1 - c0, V)
                for item, first, rows in owners:
                    lo, hi = max(first, c0), min(first + rows, c1)
                    if lo < hi:
                        item.job.add(item.index, lo - first, logp[lo - c0 : hi - c0])

    # -- the public call ----------------------------------------------------------------------

    def score(
        self,
        sequences: list[torch.Tensor],
        ranges: list[tuple[int, int]],
        support: SupportSpec,
        should_stop: Callable[[], bool] | None = None,
        caller: str = "",
    ) -> SupportValues:
        """Log-probs on `support` at every scored position, rows in request order.

        `sequences` and `ranges` must already be validated (ids in the vocabulary, ranges inside
        their sequence); `should_stop` is polled between micro-batches; `caller` identifies who
        asks, for fairness when requests of several callers are batched together.
        """
        request = _Request(ranges, support)
        self.scheduler.run(Job(sequences, ranges, request.add, should_stop, caller))
        return request.assemble()


class _Request:
    """One scoring request's rows: the support is taken as chunks of its rows arrive."""

    def __init__(self, ranges: list[tuple[int, int]], support: SupportSpec):
        self.support = support
        self.offsets = [0]
        for start, end in ranges:
            self.offsets.append(self.offsets[-1] + end - start)
        self.num_rows = self.offsets[-1]
        self.uniforms = None
        if support.kind == "sampled":
            # Drawn up front in request order: the draws don't depend on batching or chunking.
            generator = torch.Generator().manual_seed(support.seed)
            self.uniforms = torch.rand((self.num_rows, support.n), generator=generator)
        self.parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []

    def add(self, index: int, first: int, logp: torch.Tensor) -> None:
        """Rows first..first + len(logp) of sequence `index`'s scored range, as fp32 log-probs."""
        rows = torch.arange(len(logp)) + self.offsets[index] + first
        support = self.support
        if support.kind == "topk":
            out = sparse.topk(logp, support.k)
        elif support.kind == "indices":
            out = sparse.union_with_topk(logp, support.indices[rows], support.k)
        elif support.kind == "sampled":
            out = sparse.sample(logp, self.uniforms[rows], support.temperature)
        elif support.kind == "dense":
            out = (logp,)
        else:
            raise ValueError(f"unknown support kind {support.kind!r}")
        self.parts.append((rows, out))

    def assemble(self) -> SupportValues:
        return _assemble(self.support.kind, self.num_rows, self.parts)


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
