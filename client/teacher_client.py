"""TeacherClient: what a student trainer uses to get teacher signals from one or many endpoints.

    from adpa.client import TeacherClient
    from adpa.services.protocol import SupportSpec

    with TeacherClient("127.0.0.1:50051") as teacher:
        teacher.check_compatible(student_tokenizer)            # refuses a different tokenizer
        answer = teacher.score([ids], [(prompt_len - 1, len(ids) - 1)],
                               signal="advantage", support=SupportSpec("topk", k=32))
        answer.indices, answer.values, answer.tail             # (P, 32), (P, 32), (P,)

Large batches are split into requests that fit the server's limits and answers are joined back;
transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried with backoff, honouring the
server's `grpc-retry-pushback-ms`, moving to the next endpoint each time.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import grpc
import torch
from transformers import PreTrainedTokenizerBase

from adpa.fingerprint import tokenizer_fingerprint
from adpa.services import convert
from adpa.services.protocol import (
    ModelInfo,
    ScoreQuery,
    ScoreResult,
    SignalName,
    SupportSpec,
    answer_bytes_per_position,
)
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class IncompatibleTeacher(RuntimeError):
    """The teacher's tokenizer or vocabulary differs from the student's."""


def check_compatible(
    info: ModelInfo, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None, where: str = ""
) -> ModelInfo:
    """Raise IncompatibleTeacher unless the student's tokenizer and vocab size match the teacher's."""
    ours = tokenizer_fingerprint(tokenizer)
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    if ours != info.model.tokenizer_hash or vocab != info.model.vocab_size:
        raise IncompatibleTeacher(
            f"teacher {info.model.model_name}{where} has tokenizer {info.model.tokenizer_hash} "
            f"and vocab size {info.model.vocab_size}; the student has tokenizer {ours} and vocab size {vocab}. "
            "Signals are per token id, so both must use the same tokenizer."
        )
    return info


def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """'grpc://host:port' | 'grpcs://host:port' | 'host:port' -> (target, use_tls)."""
    for scheme, tls in (("grpcs://", True), ("grpc://", False)):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :], tls
    if "://" in endpoint:
        raise ValueError(f"endpoint {endpoint!r}: scheme must be grpc:// or grpcs://")
    return endpoint, False


class TeacherClient:
    """A connection to teacher or reference services, with handshake, batching and failover."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.25,
        max_message_bytes: int = 64 << 20,
        root_certificates: bytes | None = None,
    ):
        endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not endpoints:
            raise ValueError("TeacherClient needs at least one endpoint")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channels = []
        for endpoint in endpoints:
            target, tls = parse_endpoint(endpoint)
            if tls:
                creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
            self._channels.append((endpoint, channel, pb_grpc.ScorerStub(channel)))
        self.endpoints = endpoints
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_message_bytes = max_message_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._next = itertools.count()
        self._info: ModelInfo | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        for _, channel, _ in self._channels:
            channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------------

    def info(self, timeout: float | None = None) -> ModelInfo:
        """The handshake: fingerprints and limits of the service (cached after the first call)."""
        if self._info is None or timeout is not None:
            answer = self._call("ModelInfo", pb.ModelInfoRequest(), timeout or self.timeout)
            self._info = convert.info_from_pb(answer)
        return self._info

    def check_compatible(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> ModelInfo:
        """Refuse a teacher whose tokenizer or vocabulary differs from the student's.

        `vocab_size` is the student model's output size (defaults to len(tokenizer)).
        """
        return check_compatible(self.info(), tokenizer, vocab_size, where=f" at {self.endpoints[0]}")

    def score(
        self,
        sequences: Sequence[torch.Tensor | Sequence[int]],
        ranges: Sequence[tuple[int, int]],
        *,
        signal: SignalName = "logprobs",
        support: SupportSpec = SupportSpec("topk", k=32),
        value_dtype: str = "FP32",
        include_logprobs: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ScoreResult:
        """Signals at the scored positions of each sequence; rows in request order.

        Position i of a sequence is the distribution of the token after ids[i] (logits[i]), so a
        response in tokens [p, L) is scored with the range (p - 1, L - 1).
        """
        sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
        ranges = [(int(a), int(b)) for a, b in ranges]
        if len(ranges) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(ranges)} ranges")
        request_id = request_id or uuid.uuid4().hex[:16]
        results = []
        row = 0
        for part, (lo, hi) in enumerate(self._split(sequences, ranges, support, value_dtype, include_logprobs)):
            rows = sum(e - s for s, e in ranges[lo:hi])
            spec = support
            if support.indices is not None:
                spec = replace(support, indices=support.indices[row : row + rows])
            if part > 0 and support.kind == "sampled":  # fresh draws for each part of a split batch
                spec = replace(spec, seed=(support.seed * 1_000_003 + part) % 2**63)
            row += rows
            query = ScoreQuery(
                sequences=sequences[lo:hi],
                ranges=ranges[lo:hi],
                signal=signal,
                support=spec,
                value_dtype=value_dtype,
                include_logprobs=include_logprobs,
                request_id=f"{request_id}.{part}",
            )
            answer = convert.result_from_pb(self._call("Score", convert.query_to_pb(query), timeout or self.timeout))
            info = self.info()
            if answer.model != info.model or (signal == "advantage" and answer.reference != info.reference):
                raise RuntimeError(
                    f"the service now runs model {answer.model.model_hash} (reference "
                    f"{answer.reference.model_hash if answer.reference else '-'}), not the {info.model.model_hash} "
                    "of the handshake; signals from different model versions must not be mixed"
                )
            results.append(answer)
        return results[0] if len(results) == 1 else _concat(results)

    # -- internals ----------------------------------------------------------------------------

    def _split(self, sequences, ranges, support, value_dtype, include_logprobs):
        """Yield [lo, hi) slices of the batch whose requests and answers fit the server's limits."""
        limits = self.info().limits
        per_position = answer_bytes_per_position(support, value_dtype, self.info().model.vocab_size, include_logprobs)
        per_position += 4 * (support.indices.shape[1] if support.indices is not None else 0) + 16  # request + framing
        budget = int(0.8 * min(limits.max_message_bytes, self.max_message_bytes))
        max_positions = limits.max_dense_positions if support.kind == "dense" else limits.max_positions
        lo, positions, size = 0, 0, 0
        for b, (seq, (start, end)) in enumerate(zip(sequences, ranges)):
            p = end - start
            cost = p * per_position + 4 * len(seq)
            if b > lo and (positions + p > max_positions or size + cost > budget):
                yield lo, b
                lo, positions, size = b, 0, 0
            positions += p
            size += cost
        yield lo, len(sequences)

    def _call(self, method: str, request, timeout: float):
        """One RPC with deadline, retries on transient codes and failover across endpoints."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            endpoint, _, stub = self._channels[next(self._next) % len(self._channels)]
            remaining = deadline - time.monotonic()
            try:
                return getattr(stub, method)(request, timeout=max(remaining, 0.001), metadata=self._metadata)
            except grpc.RpcError as err:
                code = err.code()
                delay = _pushback_s(err)
                # RESOURCE_EXHAUSTED without a pushback hint is a size limit: retrying can't help.
                transient = code == grpc.StatusCode.UNAVAILABLE or (code in RETRYABLE and delay is not None)
                if not transient or attempt >= self.max_retries:
                    raise
                if delay is None:
                    delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                if time.monotonic() + delay >= deadline:
                    raise
                logger.warning("%s on %s: %s; retrying in %.2fs", code.name, endpoint, err.details(), delay)
                time.sleep(delay)
                attempt += 1


def _pushback_s(err: grpc.RpcError) -> float | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


def _pad_cat(parts: list[torch.Tensor | None], fill: float) -> torch.Tensor | None:
    if parts[0] is None:
        return None
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts])


def _concat(results: list[ScoreResult]) -> ScoreResult:
    """Join the answers of a split batch back into one, padding supports to a common width."""
    first = results[0]
    return ScoreResult(
        signal=first.signal,
        support=first.support,
        model=first.model,
        reference=first.reference,
        indices=_pad_cat([r.indices for r in results], -1),
        values=_pad_cat([r.values for r in results], 0.0),
        tail=_pad_cat([r.tail for r in results], 0.0),
        weights=_pad_cat([r.weights for r in results], 0.0),
        extras={k: _pad_cat([r.extras[k] for r in results], 0.0) for k in first.extras},
    )
