"""DistillTrainer: DCKD, ADPA and their variants on `transformers.Trainer`.

What a method asks the teacher for and how its loss is made is its `MethodSpec` (methods.py);
this trainer reads the spec and never the method's name. Teacher signals come from a `Teacher`
(the gRPC client, or the same service in process) and are fetched `prefetch` micro-batches ahead
on a worker thread, so the RPC overlaps training. `compute_loss` runs the student's forwards,
calls the spec's loss and logs its named parts.

Micro-batches are planned up front (a seeded shuffle of the records), and the DataLoader hands
out plan item numbers; that is what lets the prefetcher know what comes next, and what keeps
resumed runs identical to uninterrupted ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from adpa.fingerprint import model_fingerprint
from adpa.protocol import SupportSpec
from adpa.training.batch import TeacherSignals, TokenBatch, make_batch
from adpa.training.data import PreferenceExample
from adpa.training.distill_config import DistillConfig
from adpa.training.methods import LossInputs, Scored
from adpa.training.prefetch import Prefetcher
from adpa.training.rollout import generate_responses
from adpa.training.teacher import Teacher

logger = logging.getLogger(__name__)


@dataclass
class Staged:
    """A micro-batch's token batches, before the teacher has been asked."""

    chosen: TokenBatch
    other: TokenBatch | None  # y_l (sides "pair"), the student samples y_hat ("samples"), None ("chosen")
    indices: torch.Tensor | None = None  # support=indices: (P, m) ids the student asks for


@dataclass
class Prepared:
    chosen: TokenBatch
    other: TokenBatch | None
    chosen_signals: TeacherSignals | None  # None where the teacher did not score y_w (sample methods)
    other_signals: TeacherSignals | None  # None where the teacher scored y_w only


class _PlanItems(Dataset):
    """Item j of the DataLoader is micro-batch j of the plan."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict:
        return {"item": j}


def _collate(items: list[dict]) -> dict:
    return {"item": torch.tensor([it["item"] for it in items])}


def plan_batches(num_records: int, batch_size: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of record indices cut into micro-batches (the last one may be smaller)."""
    order = list(range(num_records))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_records, batch_size)]


class DistillTrainer(Trainer):
    def __init__(
        self,
        model: PreTrainedModel,
        args: DistillConfig,
        train_records: list[PreferenceExample],
        tokenizer: PreTrainedTokenizerBase,
        teacher: Teacher,
        **kwargs,
    ):
        if not train_records:
            raise ValueError("no training records")
        args.remove_unused_columns = False
        self.records = train_records
        self.plan = plan_batches(len(train_records), args.per_device_train_batch_size, args.seed)
        super().__init__(
            model=model, args=args, train_dataset=_PlanItems(len(self.plan)), data_collator=_collate,
            processing_class=tokenizer, **kwargs,
        )
        self.spec = args.method_spec
        self.teacher = teacher
        self.teacher_info = teacher.check_compatible(tokenizer, model.get_output_embeddings().weight.shape[0])
        if self.spec.signal == "advantage" and self.teacher_info.role != "teacher":
            raise ValueError(f"method {args.method} needs advantages: point --teacher at a teacher, not a reference")
        # A reference service reports beta 0; adpa-no-ref against one uses the config's beta.
        self.beta = self.teacher_info.beta if self.teacher_info.role == "teacher" else args.beta
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vocab, max_k = self.teacher_info.model.vocab_size, self.teacher_info.limits.max_k
        if args.support_k > min(vocab, max_k) or args.student_k > vocab:
            logger.warning("support_k=%d / student_k=%d exceed the vocabulary (%d) or the teacher's max_k (%d); "
                           "clamping", args.support_k, args.student_k, vocab, max_k)
            args.support_k, args.student_k = min(args.support_k, vocab, max_k), min(args.student_k, vocab)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._samples: list[list[int]] | None = None
        self._cache = Path(args.cache_dir) / self._cache_key() if args.cache_dir else None
        self.prefetcher: Prefetcher | None = None  # made per train() call

    # -- data plumbing ------------------------------------------------------------------------

    def get_train_dataloader(self):
        # One plan item per DataLoader batch, in plan order (the plan is already shuffled).
        return self._get_dataloader(
            self.train_dataset, "training", batch_size=1, sampler_fn=SequentialSampler, is_training=True
        )

    def _cache_key(self) -> str:
        a = self.args
        payload = {
            "student": model_fingerprint(str(getattr(self.model.config, "_name_or_path", ""))),
            "teacher": [self.teacher_info.model.model_hash,
                        self.teacher_info.reference.model_hash if self.teacher_info.reference else None],
            "beta": self.teacher_info.beta,
            "records": hashlib.sha256(json.dumps([vars(r) for r in self.records]).encode()).hexdigest(),
            "plan": self.plan,
            **{k: getattr(a, k) for k in ("method", "support", "support_k", "student_k", "value_dtype",
                                          "support_floor", "rollout_greedy", "rollout_temperature",
                                          "max_new_tokens", "seed")},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _offline_samples(self) -> list[list[int]]:
        """Student samples for every record, drawn once from the initial student (and cached)."""
        if self._samples is None:
            path = self._cache / "samples.json" if self._cache else None
            if path is not None and path.exists():
                self._samples = json.loads(path.read_text())
                logger.info("reusing %d cached student samples from %s", len(self._samples), path)
            else:
                logger.info("sampling %d responses from the initial student", len(self.records))
                self._samples = generate_responses(
                    self.model, self.processing_class, [r.prompt for r in self.records],
                    max_new_tokens=self.args.max_new_tokens, do_sample=not self.args.rollout_greedy,
                    temperature=self.args.rollout_temperature, seed=self.args.seed,
                )
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(self._samples))
        return self._samples

    def _stage(self, j: int) -> Staged:
        """Runs on the training thread: build the batches of plan item j (sampling needs the model)."""
        records = [self.records[i] for i in self.plan[j]]
        prompts = [r.prompt for r in records]
        chosen = make_batch(prompts, [r.chosen for r in records], self.pad_id)
        if self.spec.sides == "chosen":
            return Staged(chosen, None)
        if self.spec.sides == "pair":
            return Staged(chosen, make_batch(prompts, [r.rejected for r in records], self.pad_id))
        if self.args.rollout == "offline":
            samples = [self._offline_samples()[i] for i in self.plan[j]]
        else:
            samples = generate_responses(
                self.model, self.processing_class, prompts, max_new_tokens=self.args.max_new_tokens,
                do_sample=not self.args.rollout_greedy, temperature=self.args.rollout_temperature,
                seed=self.args.seed * 1_000_003 + j,
            )
        # A sample of zero tokens can't be scored; give it the EOS it would have ended with.
        samples = [s or [self.processing_class.eos_token_id] for s in samples]
        other = make_batch(prompts, samples, self.pad_id)
        indices = self._student_indices(other) if self.args.support == "indices" else None
        return Staged(chosen, other, indices)

    @torch.no_grad()
    def _student_indices(self, batch: TokenBatch) -> torch.Tensor:
        """(P, student_k + 1): the student's top-k and the sampled token at each scored position."""
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        top = logits[batch.mask.to(device)].topk(self.args.student_k, dim=-1).indices.cpu()  # (P, k)
        return torch.cat([top, batch.targets[batch.mask][:, None]], dim=-1)

    def _support(self, indices: torch.Tensor | None) -> SupportSpec:
        if self.args.support == "dense":
            return SupportSpec("dense")
        if indices is not None:
            return SupportSpec("indices", k=self.args.support_k, indices=indices)
        return SupportSpec("topk", k=self.args.support_k)

    def _fetch(self, j: int, staged: Staged) -> Prepared:
        """Runs on a worker thread: the teacher's signals for plan item j (or the cached ones)."""
        path = self._cache / f"signals-{j}.pt" if self._cache else None
        if path is not None and path.exists():
            cached = torch.load(path, weights_only=False)
            return Prepared(staged.chosen, staged.other, cached["chosen"], cached["other"])
        a, spec = self.args, self.spec
        # One request for everything the method sends (y_w and y_l together for "pair").
        batches = {name: getattr(staged, name) for name in spec.teacher_batches}
        answer = self.teacher.score(
            [seq for b in batches.values() for seq in b.sequences], [r for b in batches.values() for r in b.ranges],
            signal=spec.signal, support=self._support(staged.indices), value_dtype=a.value_dtype,
            include_logprobs=a.support_floor is not None and spec.signal == "advantage",
        )
        signals = dict(zip(batches, _split_signals(answer, list(batches.values()))))
        chosen_signals, other_signals = signals.get("chosen"), signals.get("other")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"chosen": chosen_signals, "other": other_signals}, path)
        return Prepared(staged.chosen, staged.other, chosen_signals, other_signals)

    # -- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(
                self._stage, self._fetch, limit=len(self.plan), depth=self.args.prefetch,
                stride=self.accelerator.num_processes,
            )
        prepared = self.prefetcher.get(int(inputs["item"][0]))
        device = next(model.parameters()).device
        a = self.args
        chosen = _forward(model, prepared.chosen, prepared.chosen_signals, device)
        other = _forward(model, prepared.other, prepared.other_signals, device) if prepared.other is not None else None
        loss, parts = self.spec.loss(LossInputs(
            chosen, other, alpha=a.alpha, gamma=a.gamma, sft_weight=a.sft_weight, beta=self.beta,
            reduction=a.loss_reduction, support_floor=a.support_floor, floor_penalty=a.floor_penalty,
        ))
        for name, value in parts.items():
            self._metrics[name].append(float(value.detach()))
        return (loss, chosen.logits) if return_outputs else loss

    # -- logging and cleanup --------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update({name: sum(v) / len(v) for name, v in self._metrics.items() if v})
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        if self.spec.uses_samples and self.args.rollout == "offline":
            self._offline_samples()  # from the initial student, before a checkpoint is loaded
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()
                self.prefetcher = None


def _forward(model, batch: TokenBatch, signals: TeacherSignals | None, device) -> Scored:
    """The student's logits on one response batch, beside the teacher's signals for it."""
    batch = batch.to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return Scored(batch, logits, signals.to(device) if signals is not None else None)


def _split_signals(answer, batches: list[TokenBatch]) -> list[TeacherSignals]:
    """One answer for the batches' sequences, in order -> signals on each batch's grid."""
    if len(batches) == 1:
        return [TeacherSignals.from_result(answer, batches[0])]
    out, start = [], 0
    for batch in batches:
        rows = sum(e - s for s, e in batch.ranges)
        sl = slice(start, start + rows)
        pick = lambda t: None if t is None else t[sl]  # noqa: E731
        part = replace(answer, indices=pick(answer.indices), values=answer.values[sl], tail=pick(answer.tail),
                       weights=pick(answer.weights), extras={k: v[sl] for k, v in answer.extras.items()})
        out.append(TeacherSignals.from_result(part, batch))
        start += rows
    return out
