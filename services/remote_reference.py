"""pi_ref behind a reference service over gRPC: a `ReferenceModel` built on the Python client."""

from __future__ import annotations

import logging
import time

import grpc

from adpa.client import TeacherClient
from adpa.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable
from adpa.protocol import ModelFingerprint, SupportValues

logger = logging.getLogger(__name__)

# Handshake answers worth waiting out at start-up: the reference is still loading, or busy.
WAIT_FOR = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.RESOURCE_EXHAUSTED})


class RemoteReference:
    """A reference service, asked only for the indices a teacher needs."""

    def __init__(self, client: TeacherClient):
        self.client = client
        self._fingerprint: ModelFingerprint | None = None

    @classmethod
    def connect(
        cls, endpoint: str, *, token: str | None = None, max_message_bytes: int = 64 << 20, wait_s: float = 600.0
    ) -> RemoteReference:
        """Connect to `endpoint`, waiting up to `wait_s` for its handshake (it may still be loading)."""
        # Few retries here: the trainer's own client retries the teacher's UNAVAILABLE, and retries
        # at both levels would multiply.
        client = TeacherClient(endpoint, token=token, max_message_bytes=max_message_bytes, max_retries=1,
                               max_busy_retries=1, backoff_s=0.1)
        reference = cls(client)
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                fp = reference.fingerprint
                logger.info("reference %s at %s (model %s)", fp.model_name, endpoint, fp.model_hash)
                return reference
            except grpc.RpcError as err:
                code = err.code()
                if code not in WAIT_FOR:  # it answered, and the answer will not change by waiting
                    reference.close()
                    hint = (" (check --reference-token / ADPA_REFERENCE_TOKEN)"
                            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) else "")
                    raise RuntimeError(
                        f"reference at {endpoint} refused the handshake with {code.name}: {err.details()}{hint}"
                    ) from None
                if time.monotonic() > deadline:
                    reference.close()
                    raise RuntimeError(f"reference at {endpoint} did not answer within {wait_s:.0f}s") from err
                if not waited:
                    logger.info("waiting for reference at %s (%s)", endpoint, code.name)
                waited = True
                time.sleep(0.5)

    @property
    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:
            self._fingerprint = self.client.info().model
        return self._fingerprint

    def score(self, sequences, ranges, support, should_stop=None, caller="", deadline=None) -> SupportValues:
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("the request's deadline passed before the reference was asked")
        try:
            answer = self.client.score(
                sequences, ranges, signal="logprobs", support=support, value_dtype="FP32", timeout=timeout
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # Not UNAVAILABLE: the caller's client would retry the whole request, and pay for it twice.
                raise DeadlineExceeded(f"the reference did not answer within the request's deadline: "
                                       f"{err.details()}") from None
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"reference model unavailable ({err.code().name}): {err.details()}") from None
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise ResourceExhausted(f"reference model busy: {err.details()}", retry_after_ms=1000) from None
            # The teacher built this request: a refusal is this deployment's fault, not the caller's.
            raise Internal(f"reference model refused the teacher's request ({err.code().name}): {err.details()}") from None
        return SupportValues(indices=answer.indices, logprobs=answer.values, log_tail=answer.tail)

    def max_indices(self) -> int:
        return self.client.info().limits.max_indices

    def ready(self) -> bool:
        try:
            self.client.info(timeout=2.0, refresh=True)
            return True
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self.client.close()
