"""DistillConfig: the settings of DCKD, ADPA and their variants, on top of transformers' TrainingArguments."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from adpa.training.methods import COMMON_DEFAULTS, METHODS, SUPPORTS, MethodSpec, default_note, get_method


@dataclass
class DistillConfig(TrainingArguments):
    r"""Settings of a distillation run. Fields below are this trainer's own; the rest are
    [`~transformers.TrainingArguments`] (learning rate, batch size, accumulation, checkpoints...).
    `per_device_train_batch_size` counts preference records (prompts) per micro-batch."""

    method: str = field(default="dckd", metadata={"help": f"distillation method: one of {list(METHODS)}"})
    teacher: str = field(
        default="grpc://127.0.0.1:50051",
        metadata={"help": "teacher endpoint(s) 'grpc://host:port[,grpc://...]', or 'local:PATH' to load it in process"},
    )
    reference: str | None = field(
        default=None, metadata={"help": "with a local teacher: path of the reference model (needed for advantages)"}
    )
    teacher_token: str | None = field(default=None, metadata={"help": "bearer token for the teacher service (default: the ADPA_TEACHER_TOKEN environment variable, which `ps` does not show)"})
    beta: float = field(default=0.1, metadata={"help": "advantage scale of a local teacher (a service reports its own)"})
    alpha: float = field(default=0.1, metadata={"help": "DCKD: weight of each KL term"})
    gamma: float | None = field(default=None, metadata={"help": f"ADPA: weight of the advantage term ({default_note('gamma')})"})
    sft_weight: float = field(default=1.0, metadata={"help": "weight of the SFT term on y_w"})
    support: str = field(default="topk", metadata={"help": "teacher support: topk (+ tail bucket), indices (student top-k + sampled token + teacher top-k), dense, or sampled (sample_n draws from the teacher with importance weights: unbiased KL and ADPA estimates)"})
    support_k: int | None = field(default=None, metadata={"help": f"teacher top-k ({default_note('support_k')})"})
    student_k: int = field(default=8, metadata={"help": "support=indices: the student's own top-k added per position"})
    sample_n: int = field(default=32, metadata={"help": "support=sampled: draws per position"})
    sample_temperature: float = field(default=1.0, metadata={"help": "support=sampled: the proposal is pi_dpo^(1/T); T > 1 reaches further into the tail"})
    value_dtype: str = field(default="FP32", metadata={"help": "dtype of signal values on the wire: FP32, BF16, FP16"})
    loss_reduction: str = field(default="mean", metadata={"help": "mean: per-token mean over the micro-batch's scored positions; sum: their sum"})
    support_floor: float | None = field(
        default=None,
        metadata={"help": "ADPA: where pi_dpo and pi_ref both give a token less than this, use floor_penalty as its advantage (e.g. 1e-3)"},
    )
    floor_penalty: float | None = field(default=None, metadata={"help": "advantage of floored tokens (default: the tail bucket's)"})
    rollout: str = field(default="offline", metadata={"help": "ADPA samples: offline (once, before training, cached) or online (fresh from the current student)"})
    rollout_greedy: bool = field(default=False, metadata={"help": "greedy student samples (the release's offline choice) instead of sampling"})
    rollout_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of student samples"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest student sample"})
    prefetch: int = field(default=1, metadata={"help": "micro-batches whose signals (and online samples) are fetched ahead; 0 = strictly on-policy"})
    cache_dir: str | None = field(default=None, metadata={"help": "offline data only: cache samples and teacher signals here and reuse them"})
    max_length: int = field(default=512, metadata={"help": "longest prompt + response in tokens"})

    def __post_init__(self):
        super().__post_init__()
        spec = get_method(self.method)  # an unknown method: ValueError listing the valid ones
        for name in COMMON_DEFAULTS:  # the method's defaults, where the field was left unset
            if getattr(self, name) is None:
                setattr(self, name, spec.default(name))
        choices = {
            "support": SUPPORTS,
            "value_dtype": ("FP32", "BF16", "FP16"),
            "loss_reduction": ("mean", "sum"),
            "rollout": ("offline", "online"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        if self.support not in spec.supports:
            raise ValueError(f"{self.method} accepts support {list(spec.supports)} only; got support={self.support!r}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.support_k < 0 or self.student_k < 0:
            raise ValueError(f"support_k and student_k must be >= 0, got {self.support_k}, {self.student_k}")
        if self.support == "topk" and self.support_k < 1:
            raise ValueError("support=topk needs support_k >= 1")
        if self.rollout == "online" and self.cache_dir:
            raise ValueError("cache_dir caches fixed data; online rollouts change every step, so they can't be cached")
        if self.support_floor is not None and self.support in ("dense", "sampled") and self.floor_penalty is None:
            raise ValueError(f"support={self.support} has no tail bucket: support_floor needs floor_penalty")
        if self.support == "sampled" and not (self.sample_n >= 1 and self.sample_temperature > 0):
            raise ValueError(f"support=sampled needs sample_n >= 1 and sample_temperature > 0, got {self.sample_n}, "
                             f"{self.sample_temperature}")
        if self.support_floor is not None and not 0 < self.support_floor < 1:
            raise ValueError(f"support_floor must be in (0, 1), got {self.support_floor}")

    @property
    def method_spec(self) -> MethodSpec:
        """The method's entry in the registry (training/methods.py)."""
        return get_method(self.method)
