"""The scoring engine: an HF causal LM -> fp32 log-probs on a support, at requested positions only.

The model body runs once per micro-batch; the output head and the fp32 log-softmax run only on
the hidden states of scored positions, a chunk of rows at a time, so no fp32 (positions, V)
block larger than `logits_budget_bytes` is built (dense answers excepted: they are the answer).
Sequences of one request that share a prefix of `min_shared_prefix` tokens or more (a prompt
with y_w and y_l) run that prefix once and continue its key/value cache (`prefix.py`).
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adpa import sparse
from adpa.fingerprint import model_fingerprint, tokenizer_fingerprint
from adpa.protocol import ModelFingerprint, SupportSpec, SupportValues
from adpa.services.batching import BatchObserver, Item, Job, Scheduler
from adpa.services.prefix import shared_prefix_groups

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
        min_shared_prefix: int = 16,
        observer: BatchObserver | None = None,
        deterministic: bool = False,
        hold_s: float = 0.0,
    ):
        """`observer` is told about every forward micro-batch (the server's metrics); `deterministic`
        forwards one item (a sequence, or a request's sequences sharing a prefix) at a time, so an
        answer is bit-identical to the same request's alone, whatever was queued with it; `hold_s`:
        the longest a caller that was just answered holds others back (`batching.py`; 0: never)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Inputs go where the input embeddings are: with a device map the model spans devices, and
        # accelerate's hooks move activations between them (and to the output head) from there.
        self.device = model.get_input_embeddings().weight.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]  # rows, padding included
        # The real ids: signals live on [0, shared_vocab); rows above it are padding (see ModelFingerprint).
        self.shared_vocab = min(len(tokenizer), self.vocab_size)
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
            tokenizer_size=len(tokenizer),
        )
        self._head_only = self._head_path_matches()
        # transformers renamed `past_key_values` to `cache` (5.2x): use the model's spelling.
        forward = (self.model.get_decoder() if self._head_only else self.model).forward
        self._cache_name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.min_shared_prefix = min_shared_prefix if min_shared_prefix and self._prefix_cache_matches() else 0
        self.scheduler = Scheduler(
            self._forward, max_batch_tokens=max_batch_tokens, batching=batching, wait_s=batch_wait_s,
            name=f"adpa-batcher-{name}", observer=observer, deterministic=deterministic,
            hold_s=hold_s,
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
        served_name: str | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        attn_implementation: str = "sdpa",
        **kwargs,
    ) -> ScoringEngine:
        """Load a model and its tokenizer (local folder, or hub id where a hub is reachable);
        `served_name` is the name its fingerprint carries (default: `name_or_path`).

        With `device_map` (and optionally `max_memory`) accelerate places the layers over several
        devices as it loads them (a model larger than one GPU); without it the model goes to `device`.
        """
        on_gpu = device_map not in (None, "cpu") and torch.cuda.is_available()
        dev = torch.device("cuda") if on_gpu else resolve_device("cpu" if device_map == "cpu" else device)
        placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype, dev),
            revision=revision,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            **placement,
        )
        if device_map is None:
            model = model.to(dev)
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        commit = getattr(model.config, "_commit_hash", None) or revision
        return cls(model, tokenizer, name=served_name or name_or_path, model_hash=model_fingerprint(name_or_path, commit),
                   **kwargs)

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

    def _prefix_cache_matches(self) -> bool:
        """Check once that a cached prefix continued by a batch of suffixes gives the positions the
        full forward gives; models whose cache cannot be shared that way score every token."""
        ids = torch.arange(min(12, self.vocab_size), device=self.device) % self.vocab_size
        other = ids.clone()
        other[-2:] = other[-2:].flip(0)
        job = Job([ids, other], [(0, len(ids))] * 2, lambda *a: None)
        try:
            with torch.inference_mode():
                shared = self._scored_shared(Item(job, (0, 1), prefix=6))
                plain = self._scored_plain([(job, 0), (job, 1)])
            if all(torch.allclose(a[2].float(), b[2].float(), atol=1e-3, rtol=1e-3) for a, b in zip(shared, plain)):
                return True
        except Exception as err:  # noqa: BLE001 - any cache this engine cannot continue
            logger.warning("shared prefixes off: the model's cache cannot be continued (%r)", err)
            return False
        logger.warning("shared prefixes off: a continued cache does not reproduce the full forward")
        return False

    def _body(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) final hidden states."""
        return self.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, *, cache=None, keep_cache: bool = False):
        """(B, T) -> ((B, T, F) features, the key/value cache if `keep_cache`): hidden states, or
        logits when the head path cannot be used. `cache` continues a prefix computed before (its
        mask columns come first in `mask`); without it no cache is built at all."""
        module = self.model.get_decoder() if self._head_only else self.model
        use_cache = keep_cache or cache is not None
        out = module(input_ids=ids, attention_mask=mask, use_cache=use_cache, **{self._cache_name: cache})
        features = out.last_hidden_state if self._head_only else out.logits
        return features, getattr(out, self._cache_name) if keep_cache else None

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, H) hidden states -> (R, V) fp32 logits."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    def _log_softmax(self, features: torch.Tensor) -> torch.Tensor:
        logits = self._logits(features) if self._head_only else features.float()
        return logits.log_softmax(-1)

    def _forward(self, group: list[Item]) -> None:
        """One micro-batch: the body once over the padded sequences (items with a shared prefix:
        the prefix once, then their own tokens against its key/value cache), then the head and an
        fp32 log-softmax on the scored rows only, a chunk of rows at a time; each chunk's rows go
        back to the job they belong to (`Job.add`, once per job and chunk), where the job's support
        is taken."""
        with torch.inference_mode():
            scored = []  # (job, sequence index, (rows, F) features of its scored range)
            plain = [item for item in group if not item.prefix]
            if plain:
                scored += self._scored_plain([(item.job, item.indices[0]) for item in plain])
            for item in group:
                if item.prefix:
                    scored += self._scored_shared(item)
            picked = torch.cat([features for _, _, features in scored])  # (R, F)
            owners, offset = [], 0  # (job, sequence index, first row in `picked`, rows)
            for job, b, features in scored:
                owners.append((job, b, offset, len(features)))
                offset += len(features)
            start = 0  # the first owner with rows at or after c0: owners are in row order, so each
            # is visited once per chunk it overlaps (O(owners + chunks), not owners x chunks)
            for c0 in range(0, offset, self.rows_per_chunk):
                c1 = min(c0 + self.rows_per_chunk, offset)
                logp = self._log_softmax(picked[c0:c1])  # (c1 - c0, V), on the model's device
                # Per job: its rows of this chunk (positions in `logp`) and their request row numbers.
                # Supports are taken row by row, so one call per job gives what one call per sequence
                # gives, without the per-call overhead that dominates small requests.
                taken: dict[Job, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
                while start < len(owners) and owners[start][2] + owners[start][3] <= c0:
                    start += 1
                for job, b, first, rows in itertools.islice(owners, start, None):
                    if first >= c1:
                        break
                    lo, hi = max(first, c0), min(first + rows, c1)
                    local, request = taken.setdefault(job, ([], []))
                    local.append(torch.arange(lo - c0, hi - c0))
                    request.append(torch.arange(lo - first, hi - first) + job.first_row[b])
                for job, (local, request) in taken.items():
                    at = torch.cat(local)
                    first, last = int(at[0]), int(at[-1])
                    rows = logp[first : last + 1] if last - first + 1 == len(at) else logp[at.to(logp.device)]
                    job.add(torch.cat(request), rows)

    def _scored_plain(self, members: list[tuple[Job, int]]) -> list[tuple[Job, int, torch.Tensor]]:
        """Right-padded sequences in one forward; the features of each one's scored range."""
        width = max(len(job.sequences[b]) for job, b in members)
        ids = torch.full((len(members), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, (job, b) in enumerate(members):
            ids[row, : len(job.sequences[b])] = job.sequences[b]
            mask[row, : len(job.sequences[b])] = 1
        # No padding, no mask: the model may then take its plain causal attention path.
        padded = bool((mask == 0).any())
        features, _ = self._run(ids.to(self.device), mask.to(self.device) if padded else None)  # (n, T, F)
        return [(job, b, features[row, slice(*job.ranges[b])]) for row, (job, b) in enumerate(members)]

    def _scored_shared(self, item: Item) -> list[tuple[Job, int, torch.Tensor]]:
        """Sequences sharing their first `item.prefix` tokens: the prefix once (keeping its key/value
        cache), then each one's own tokens, right-padded, against that cache."""
        job, p = item.job, item.prefix
        sequences = [job.sequences[b] for b in item.indices]
        prefix = sequences[0][:p].to(self.device)[None]  # (1, p)
        head, cache = self._run(prefix, torch.ones_like(prefix), keep_cache=True)  # (1, p, F)
        cache.batch_repeat_interleave(len(sequences))
        width = max(len(s) for s in sequences) - p
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), p + width), dtype=torch.long)
        mask[:, :p] = 1
        for row, seq in enumerate(sequences):
            ids[row, : len(seq) - p] = seq[p:]
            mask[row, p : len(seq)] = 1
        tails, _ = self._run(ids.to(self.device), mask.to(self.device), cache=cache)  # (n, T - p, F)
        out = []
        for row, b in enumerate(item.indices):
            full = torch.cat([head[0], tails[row, : len(sequences[row]) - p]])  # (L, F)
            out.append((job, b, full[slice(*job.ranges[b])]))
        return out

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
        request = _Request(sum(end - start for start, end in ranges), support, self.shared_vocab)
        groups = shared_prefix_groups(sequences, self.min_shared_prefix) if self.min_shared_prefix else []
        self.scheduler.run(Job(sequences, ranges, request.add, should_stop, caller, groups))
        return request.assemble()


class _Request:
    """One scoring request's rows: the support is taken as chunks of its rows arrive."""

    def __init__(self, num_rows: int, support: SupportSpec, vocab: int):
        self.support = support
        self.num_rows = num_rows
        self.vocab = vocab  # support ids stay below it (padding rows never returned)
        self.uniforms = None
        if support.kind == "sampled":
            # Drawn up front in request order: the draws don't depend on batching or chunking.
            generator = torch.Generator().manual_seed(support.seed)
            # float64: a float32 uniform cannot address the deep tail of a large vocabulary.
            self.uniforms = torch.rand((self.num_rows, support.n), generator=generator, dtype=torch.float64)
        self.parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []

    def add(self, rows: torch.Tensor, logp: torch.Tensor) -> None:
        """fp32 log-probs of request rows `rows` (row numbers in request order, any order).

        The support is taken where `logp` is (the GPU, when the model is there): only the
        (rows, width) answer comes back to host memory, never the (rows, V) block.
        """
        support, device, vocab = self.support, logp.device, self.vocab
        if support.kind == "topk":
            out = sparse.topk(logp, support.k, vocab)
        elif support.kind == "indices":
            out = sparse.union_with_topk(logp, support.indices[rows].to(device), support.k, vocab)
        elif support.kind == "sampled":
            out = sparse.sample(logp, self.uniforms[rows].to(device), support.temperature, vocab)
        elif support.kind == "dense":
            out = (logp[:, :vocab],)  # normalised over every row, returned on the real ids
        else:
            raise ValueError(f"unknown support kind {support.kind!r}")
        self.parts.append((rows, tuple(t.cpu() for t in out)))

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
