"""ServeConfig: every setting of a teacher or reference service, for the CLI, YAML and environment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from adpa.config import AdpaSettings
from adpa.protocol import Limits


class ServeConfig(AdpaSettings):
    role: Literal["teacher", "reference"] = Field(
        description="teacher: serves pi_dpo log-probs and advantages; reference: serves pi_ref log-probs"
    )
    model: str = Field(description="model to serve: a local folder or a hub id")
    served_model_name: str | None = Field(
        None, description="the name callers see (answers' model_name, /v1/info, the adpa_model_info metric, logs), "
        "as vLLM's flag; default: model as given. The path stays in this server's own log only"
    )
    reference_served_model_name: str | None = Field(
        None, description="teacher with a reference model in process (or a Ray reference deployment): the name its "
        "fingerprint carries; default: reference as given"
    )
    reference: str | None = Field(
        None,
        description="teacher only: the reference model, as a local folder / hub id (loaded in this process) "
        "or an endpoint grpc://host:port of a running reference service",
    )
    beta: float = Field(0.1, description="teacher only: advantage scale, A = beta * (log pi_dpo - log pi_ref)")
    host: str = Field("127.0.0.1", description="address to bind; use 0.0.0.0 to serve other machines")
    port: int = Field(50051, description="gRPC port")
    http_port: int = Field(8080, description="HTTP port (health, readiness, info, metrics, JSON scoring); 0 = off")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, ... (ignored with device_map)")
    device_map: str | None = Field(
        None, description="spread one model over several devices (accelerate's big-model loading): auto, balanced, "
        "balanced_low_0, sequential, cpu, or a JSON map of module names to devices; a Ray replica with "
        "ray_gpus_per_replica > 1 uses auto when this is unset"
    )
    max_memory: str | None = Field(
        None, description="with device_map: memory per device, as JSON {\"0\": \"70GiB\", \"cpu\": \"100GiB\"} or "
        "0=70GiB,1=70GiB,cpu=100GiB"
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="attention kernels passed to from_pretrained (flash_attention_2 needs the flash-attn package)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: bfloat16 on GPU, float32 on CPU); log-softmax is always fp32"
    )
    revision: str | None = Field(None, description="hub revision of the model(s)")
    trust_remote_code: bool = Field(False, description="allow model code from the hub")
    max_seq_len: int | None = Field(None, description="longest accepted sequence (default: the model's)")
    max_batch_tokens: int = Field(8192, description="padded tokens per forward micro-batch")
    batching: bool = Field(
        True, description="pack the sequences of concurrent requests (all callers) into shared forward micro-batches"
    )
    min_shared_prefix: int = Field(
        16, description="sequences of one request that share their first N or more tokens (a prompt scored with "
        "y_w and y_l) forward that prefix once; 0 = never"
    )
    batch_wait_ms: float = Field(
        0.0, description="with batching: how long a micro-batch that is not full waits for more requests to join"
    )
    turn_hold_ms: float = Field(
        0.0, description="with batching: how long after an answer a caller that came back that quickly the last "
        "time (a trainer in a loop) keeps its turn: callers served more tokens wait for its next request rather "
        "than take its share of the device meanwhile, e.g. 500 for equal shares between unequal trainers; set it "
        "above the trainers' round trip, below their compute between requests. 0 (default) = never wait: the "
        "device never idles and a request's micro-batches depend only on what is queued, but a caller's share "
        "shrinks with its round trip (docs/operations.md)"
    )
    deterministic: bool = Field(
        False, description="answers bit-identical to the same request sent alone, whatever other requests share the "
        "server: each forward holds one sequence (or one request's sequences sharing a prefix), never other "
        "requests' sequences; costs throughput under concurrent load (docs/operations.md). Set it on the reference "
        "service too"
    )
    logits_budget_mb: float = Field(
        64, description="largest fp32 [positions, vocab] block built at once, in MiB"
    )
    max_k: int = Field(256, description="largest k of TOPK / INDICES supports")
    max_samples: int = Field(256, description="largest n of SAMPLED supports")
    max_indices: int = Field(
        1024, description="largest INDICES support per position (caller ids + k); a remote reference needs at least its teacher's"
    )
    max_positions: int = Field(65536, description="largest number of scored positions per request")
    max_dense_positions: int = Field(4096, description="largest number of positions per DENSE request")
    max_message_mb: float = Field(64, description="largest gRPC message received or sent, in MiB")
    max_inflight: int = Field(
        16, description="requests running or queued at once; more are refused with RESOURCE_EXHAUSTED"
    )
    receive_timeout_s: float = Field(
        30.0, description="time a caller has, from the start of a call, to send its request (gRPC message, HTTP "
        "body); a stalled call is ended with DEADLINE_EXCEEDED (HTTP 408)"
    )
    http_max_body_mb: float = Field(
        4.0, description="largest HTTP request body, in MiB (a larger one is refused with 413 before it is read)"
    )
    auth_token: SecretStr | None = Field(None, description="bearer token callers must send (off when unset)")
    open_metrics: bool = Field(
        True, description="with auth_token: serve /metrics without a token (like vLLM, for scrapers); false: "
        "/metrics needs the token too"
    )
    reference_token: SecretStr | None = Field(None, description="bearer token for a remote reference")
    watch_reference_s: float = Field(
        5.0, description="with a remote reference: how often the teacher asks it whether it answers (gRPC health of "
        "adpa.v1.Scorer turns NOT_SERVING while it does not; HTTP /readyz asks it on every probe)"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain; serve TLS when set with tls_key")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    grace_period_s: float = Field(10.0, description="on SIGTERM, time to finish running requests")
    torch_threads: int | None = Field(None, description="torch CPU threads (default: torch's choice)")
    ray: bool = Field(
        False, description="run as a Ray Serve application (teacher and reference deployments) instead of one process"
    )
    ray_address: str = Field(
        "local", description="with ray: the cluster: 'local' starts one here, 'auto' joins this node's, or ray://host:10001"
    )
    ray_replicas: int = Field(1, description="with ray: teacher replicas")
    ray_reference_replicas: int = Field(1, description="with ray: reference replicas (when the reference is a model)")
    ray_autoscale: str | None = Field(
        None, description="with ray: MIN:MAX teacher replicas, added and removed by Serve's autoscaler as trainers "
        "come and go (instead of ray_replicas); e.g. 1:4"
    )
    ray_target_ongoing_requests: float | None = Field(
        None, description="with ray_autoscale: the requests per replica (running or queued on it) that Serve scales "
        "towards; default: half of max_inflight, so that a replica batches several callers' requests before another "
        "is added, and a burst above the target still queues on a replica (and joins its batches) rather than in "
        "the proxy"
    )
    ray_upscale_delay_s: float = Field(
        10.0, description="with ray_autoscale: how long the load must stay above the target before a replica is "
        "added (short: a new replica takes its model load time to be ready)"
    )
    ray_downscale_delay_s: float = Field(
        300.0, description="with ray_autoscale: how long the load must stay below the target before a replica is "
        "removed (long: a trainer pausing for evaluation or a checkpoint keeps its replica)"
    )
    ray_autoscale_metrics_s: float = Field(
        10.0, description="with ray_autoscale: how often replicas and proxies report their requests to Serve's "
        "controller; the load is averaged over 3 periods (10: Serve's own defaults, 10 s and 30 s)"
    )
    ray_colocate_reference: bool = Field(
        False, description="with ray: load the reference model in every teacher replica (one forward each, no "
        "transfer) instead of running a reference deployment"
    )
    ray_cpus_per_replica: float = Field(1.0, description="with ray: CPUs reserved by each replica")
    ray_gpus_per_replica: float = Field(0.0, description="with ray: GPUs reserved by each replica (e.g. 1, or 0.5 to pack two)")
    ray_allow_degraded: bool = Field(
        False, description="with ray: serve even when the cluster cannot place every replica asked for (a warning "
        "in the log and in /readyz detail); off: refuse to start (exit 2)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("device_map", "max_memory", mode="before")
    @classmethod
    def _mapping_as_text(cls, value: Any) -> Any:
        """A YAML mapping is kept as its JSON text: one form for flags, YAML and environment."""
        return json.dumps(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.role == "teacher" and not self.reference:
            raise ValueError("role=teacher needs reference (a model path or grpc://host:port)")
        if self.role == "reference" and self.reference:
            raise ValueError(f"role=reference takes no reference, got reference={self.reference!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.min_shared_prefix < 0:
            raise ValueError(f"min_shared_prefix must be >= 0, got {self.min_shared_prefix}")
        if self.receive_timeout_s <= 0 or self.http_max_body_mb <= 0 or self.watch_reference_s <= 0:
            raise ValueError(f"receive_timeout_s, http_max_body_mb and watch_reference_s must be > 0, got "
                             f"{self.receive_timeout_s}, {self.http_max_body_mb}, {self.watch_reference_s}")
        if self.batch_wait_ms < 0 or self.turn_hold_ms < 0:
            raise ValueError(f"batch_wait_ms and turn_hold_ms must be >= 0, got {self.batch_wait_ms}, "
                             f"{self.turn_hold_ms}")
        self.device_map_arg()  # a bad map or memory spec is refused at start, with the value in the message
        self.max_memory_arg()
        if self.max_memory and not self.device_map:
            raise ValueError(f"max_memory={self.max_memory!r} needs device_map (e.g. auto)")
        if self.ray_replicas < 1 or self.ray_reference_replicas < 1:
            raise ValueError(f"ray_replicas and ray_reference_replicas must be >= 1, got {self.ray_replicas}, "
                             f"{self.ray_reference_replicas}")
        if self.ray_autoscale is not None:
            low, high = self.ray_autoscale_range  # a malformed MIN:MAX is refused here, with the value
            if not 1 <= low <= high:
                raise ValueError(f"ray_autoscale {self.ray_autoscale!r}: expected MIN:MAX with 1 <= MIN <= MAX")
            target = self.autoscale_target
            if not 0 < target <= self.max_inflight:
                raise ValueError(f"ray_target_ongoing_requests must be in (0, max_inflight={self.max_inflight}], got "
                                 f"{target}: a replica holds at most max_inflight requests")
        if min(self.ray_upscale_delay_s, self.ray_downscale_delay_s) < 0 or self.ray_autoscale_metrics_s <= 0:
            raise ValueError("ray_upscale_delay_s and ray_downscale_delay_s must be >= 0, ray_autoscale_metrics_s > 0")
        return self

    def device_map_arg(self) -> str | dict[str, int | str] | None:
        """`device_map` as from_pretrained takes it: a strategy name, or the parsed JSON map."""
        value = self.device_map
        if value is None or not value.lstrip().startswith("{"):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"device_map {value!r} is not valid JSON: {err}") from None
        return {str(k): v for k, v in parsed.items()}

    def max_memory_arg(self) -> dict[int | str, str] | None:
        """`max_memory` as from_pretrained takes it: {0: "70GiB", "cpu": "100GiB"} (GPU ids as ints)."""
        return parse_max_memory(self.max_memory) if self.max_memory else None

    @property
    def ray_autoscale_range(self) -> tuple[int, int]:
        """`ray_autoscale` as (MIN, MAX) replicas; (ray_replicas, ray_replicas) when it is unset."""
        if self.ray_autoscale is None:
            return self.ray_replicas, self.ray_replicas
        low, sep, high = self.ray_autoscale.partition(":")
        try:
            return int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"ray_autoscale {self.ray_autoscale!r}: expected MIN:MAX, e.g. 1:4") from None

    @property
    def autoscale_target(self) -> float:
        """Requests per replica Serve's autoscaler aims at (`ray_target_ongoing_requests` or its default)."""
        if self.ray_target_ongoing_requests is not None:
            return self.ray_target_ongoing_requests
        return max(1.0, self.max_inflight / 2)

    @property
    def remote_reference(self) -> bool:
        return bool(self.reference) and self.reference.startswith(("grpc://", "grpcs://"))

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * (1 << 20))

    def limits(self) -> Limits:
        """The limits announced in the handshake: the fields (and property) of the same names."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})


def parse_max_memory(text: str) -> dict[int | str, str]:
    """'0=70GiB,1=70GiB,cpu=100GiB' or '{"0": "70GiB", "cpu": "100GiB"}' -> {0: '70GiB', 1: '70GiB', 'cpu': '100GiB'}.

    Accelerate reads GPU ids as ints and "cpu" / "disk" as names.
    """
    if text.lstrip().startswith("{"):
        try:
            pairs = list(json.loads(text).items())
        except json.JSONDecodeError as err:
            raise ValueError(f"max_memory {text!r} is not valid JSON: {err}") from None
    else:
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"max_memory {text!r}: expected DEVICE=SIZE pairs like 0=70GiB,cpu=100GiB")
    out: dict[int | str, str] = {}
    for device, size in pairs:
        device = str(device).strip()
        if not (device.isdigit() or device in ("cpu", "disk", "mps")):
            raise ValueError(f"max_memory {text!r}: device {device!r} must be a GPU id, cpu or disk")
        out[int(device) if device.isdigit() else device] = str(size).strip()
    return out
