"""DistillConfig: the settings of DCKD, ADPA and their variants, on top of transformers' TrainingArguments."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

# method -> (teacher signal, data the loss reads, short description)
METHODS: dict[str, tuple[str, str, str]] = {
    "dckd": ("logprobs", "pairs", "SFT(y_w) + alpha * (KL(pi_dpo || pi_theta) on y_w + on y_l)"),
    "dckd-no-rejected": ("logprobs", "pairs", "SFT(y_w) + alpha * KL on y_w only (ablation)"),
    "vanilla-kd": ("logprobs", "pairs", "KL(pi_dpo || pi_theta) on y_w, no SFT term"),
    "adpa": ("advantage", "samples", "SFT(y_w) - gamma * E_t sum_a pi_theta(a) A(a) on student samples"),
    "adpa-no-ref": ("logprobs", "samples", "ADPA with A = beta * log pi_dpo (ablation: no reference)"),
    "adpa-release": ("advantage", "samples", "the paper release: A clamped to [1e-8, 1], no beta, top-50, gamma 1.6"),
    "q-argmax": ("advantage", "samples", "SFT(y_w) + CE to argmax_a A(a) on samples"),
    "q-softmax": ("advantage", "samples", "SFT(y_w) + KL(softmax(A) || pi_theta) on samples"),
}


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
    teacher_token: str | None = field(default=None, metadata={"help": "bearer token for the teacher service"})
    beta: float = field(default=0.1, metadata={"help": "advantage scale of a local teacher (a service reports its own)"})
    alpha: float = field(default=0.1, metadata={"help": "DCKD: weight of each KL term"})
    gamma: float | None = field(default=None, metadata={"help": "ADPA: weight of the advantage term (default 1.0; 1.6 for adpa-release)"})
    sft_weight: float = field(default=1.0, metadata={"help": "weight of the SFT term on y_w"})
    support: str = field(default="topk", metadata={"help": "teacher support: topk, indices (student top-k + sampled token + teacher top-k), or dense"})
    support_k: int | None = field(default=None, metadata={"help": "teacher top-k (default 32; 50 for adpa-release)"})
    student_k: int = field(default=8, metadata={"help": "support=indices: the student's own top-k added per position"})
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
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        release = self.method == "adpa-release"
        self.gamma = self.gamma if self.gamma is not None else (1.6 if release else 1.0)
        self.support_k = self.support_k if self.support_k is not None else (50 if release else 32)
        if release and self.support != "topk":
            raise ValueError(f"adpa-release uses the teacher's top-k only; got support={self.support!r}")
        choices = {
            "support": ("topk", "indices", "dense"),
            "value_dtype": ("FP32", "BF16", "FP16"),
            "loss_reduction": ("mean", "sum"),
            "rollout": ("offline", "online"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.support_k < 0 or self.student_k < 0:
            raise ValueError(f"support_k and student_k must be >= 0, got {self.support_k}, {self.student_k}")
        if self.support == "topk" and self.support_k < 1:
            raise ValueError("support=topk needs support_k >= 1")
        if self.rollout == "online" and self.cache_dir:
            raise ValueError("cache_dir caches fixed data; online rollouts change every step, so they can't be cached")
        if self.support_floor is not None and self.support == "dense" and self.floor_penalty is None:
            raise ValueError("support=dense has no tail bucket: support_floor needs floor_penalty")
        if self.support_floor is not None and not 0 < self.support_floor < 1:
            raise ValueError(f"support_floor must be in (0, 1), got {self.support_floor}")

    @property
    def signal(self) -> str:
        return METHODS[self.method][0]

    @property
    def uses_samples(self) -> bool:
        return METHODS[self.method][1] == "samples"
