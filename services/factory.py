"""Build the scoring service a `ServeConfig` names: load the model(s), connect the reference.

    metrics = ServiceMetrics()
    with open_service(config, observer=metrics.observe_batch) as service:
        frontend = Frontend(service, max_inflight=config.max_inflight, metrics=metrics)
        ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adpa.services.batching import BatchObserver
from adpa.services.config import ServeConfig
from adpa.services.engine import ScoringEngine
from adpa.services.reference import LocalReference, ReferenceModel
from adpa.services.scoring import ScoringService

logger = logging.getLogger(__name__)


def load_engine(
    config: ServeConfig, model: str, served_name: str | None = None, observer: BatchObserver | None = None,
    *, hold_turns: bool = True,
) -> ScoringEngine:
    """One model of `config` as a scoring engine, with the config's device, dtype and budgets;
    `observer` is told about its forward micro-batches; `hold_turns` False: turn_hold_ms is 0."""
    return ScoringEngine.from_pretrained(
        model,
        served_name=served_name,
        device_map=config.device_map_arg(),
        max_memory=config.max_memory_arg(),
        attn_implementation=config.attn_implementation,
        device=config.device,
        dtype=config.dtype,
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        max_seq_len=config.max_seq_len,
        max_batch_tokens=config.max_batch_tokens,
        logits_budget_bytes=int(config.logits_budget_mb * (1 << 20)),
        batching=config.batching,
        batch_wait_s=config.batch_wait_ms / 1000,
        min_shared_prefix=config.min_shared_prefix,
        observer=observer,
        deterministic=config.deterministic,
        hold_s=config.turn_hold_ms / 1000 if hold_turns else 0.0,
    )


def connect_reference(config: ServeConfig) -> ReferenceModel:
    """A teacher's reference: a remote service (grpc://...) or a second engine in this process."""
    if config.remote_reference:
        from adpa.services.remote_reference import RemoteReference

        token = config.reference_token.get_secret_value() if config.reference_token else None
        return RemoteReference.connect(config.reference, token=token, max_message_bytes=config.max_message_bytes)
    logger.info("loading reference model %s in process", config.reference)
    # No holding back in the reference: a request reaches it after the teacher's engine, whose turns are
    # already fair; a caller that is away from the reference is in the teacher's queue, not at its trainer.
    return LocalReference(load_engine(config, config.reference, config.reference_served_model_name,
                                      hold_turns=False))


def build_service(
    config: ServeConfig, reference: ReferenceModel | None = None, observer: BatchObserver | None = None
) -> ScoringService:
    """Load the model a config names and wire it to its reference (`reference` overrides the config's);
    `observer` is told about the served model's forward micro-batches."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    logger.info("loading %s model %s", config.role, config.model)
    engine = load_engine(config, config.model, config.served_model_name, observer)
    if config.role == "teacher" and reference is None:
        reference = connect_reference(config)
    try:
        return ScoringService(engine, role=config.role, reference=reference, beta=config.beta, limits=config.limits())
    except BaseException:
        if reference is not None:
            reference.close()
        raise


@contextmanager
def open_service(
    config: ServeConfig, reference: ReferenceModel | None = None, observer: BatchObserver | None = None
) -> Iterator[ScoringService]:
    """`build_service`, closed (reference connection released) when the block ends."""
    service = build_service(config, reference, observer)
    try:
        yield service
    finally:
        service.close()
