"""DistillTrainer: DCKD, ADPA and their variants on `transformers.Trainer`.

What a method asks the teacher for and how its loss is made is its `MethodSpec` (methods.py);
this trainer reads the spec and never the method's name. Teacher signals come from a `Teacher`
(the gRPC client, or the same service in process) and are fetched `prefetch` micro-batches ahead
on a worker thread, so the RPC overlaps training. `compute_loss` runs the student's forwards,
calls the spec's loss and logs its named parts.

Micro-batches are planned up front (a seeded shuffle of the records), and the DataLoader hands
out plan item numbers; that is what lets the prefetcher know what comes next, and what keeps
resumed runs identical to uninterrupted ones.

Data parallel (torchrun / accelerate launch, DDP or FSDP or ZeRO-3): accelerate hands rank r the
items r, r + W, r + 2W, ... (W processes). The plan has a multiple of W items, so no item is handed
out twice; each rank samples, stages, fetches and caches only its own items, and offline samples are
seeded per record, so W ranks draw what one process draws.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from contextlib import contextmanager
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
from adpa.training.rollout import generate_responses, generation_model
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


# Offline samples: record i is drawn from its own stream, seeded with seed * OFFLINE_SEED_STRIDE + i.
OFFLINE_SEED_STRIDE = 1_000_003
# Offline samples are drawn this many records at a time (rounded to whole micro-batches).
SAMPLE_BATCH = 64


def plan_batches(num_records: int, batch_size: int, seed: int, world_size: int = 1) -> list[list[int]]:
    """A seeded shuffle of record indices cut into micro-batches of `batch_size`.

    The number of micro-batches is `world_size * ceil(num_records / (world_size * batch_size))`, a
    multiple of the number of processes, so accelerate's `even_batches` never has to repeat one (it
    hands the first items out again to ranks that would otherwise run short: those records would be
    trained on twice). The records that don't fill whole micro-batches are spread evenly over the
    last ones, which are smaller. With one process this is the plain cut: full micro-batches and
    the remainder last.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    order = list(range(num_records))
    random.Random(seed).shuffle(order)
    items = world_size * -(-num_records // (world_size * batch_size))
    if num_records < items:
        raise ValueError(
            f"{num_records} records can't be cut into a multiple of {world_size} micro-batches of at most "
            f"{batch_size} (per_device_train_batch_size) without repeating a record: every one of the "
            f"{world_size} processes needs a micro-batch in every step. Use a number of records that is a "
            f"multiple of {world_size}, or at least {2 * world_size} records with per_device_train_batch_size >= 2."
        )
    # As many full micro-batches as leave at least one record for each remaining one.
    full = items if batch_size == 1 else min(items, (num_records - items) // (batch_size - 1))
    rest, tail = num_records - full * batch_size, items - full
    sizes = [batch_size] * full + [rest // tail + (k < rest % tail) for k in range(tail)]
    starts = [sum(sizes[:k]) for k in range(items)]
    return [order[s : s + n] for s, n in zip(starts, sizes)]


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
        _refuse_fsdp_on_cpu(args)
        self.records = train_records
        self.world_size = args.world_size  # data-parallel processes (sets up torch.distributed when launched)
        self.plan = plan_batches(len(train_records), args.per_device_train_batch_size, args.seed, self.world_size)
        super().__init__(
            model=model, args=args, train_dataset=_PlanItems(len(self.plan)), data_collator=_collate,
            processing_class=tokenizer, **kwargs,
        )
        if self.accelerator.num_processes != self.world_size:
            raise RuntimeError(f"planned for {self.world_size} processes, accelerate runs {self.accelerator.num_processes}")
        if _fsdp_requested(args) and not self.is_fsdp_enabled:
            raise ValueError(
                f"FSDP was requested (--fsdp or an accelerate FSDP config) but accelerate runs "
                f"{self.accelerator.distributed_type.value}: it would train unsharded without saying so"
            )
        self.rank = self.accelerator.process_index
        self.spec = args.method_spec
        self.teacher = teacher
        self.teacher_info = teacher.check_compatible(tokenizer, model.get_output_embeddings().weight.shape[0])
        if self.spec.signal == "advantage" and self.teacher_info.role != "teacher":
            raise ValueError(f"method {args.method} needs advantages: point --teacher at a teacher, not a reference")
        # A reference service reports beta 0; adpa-no-ref against one uses the config's beta.
        self.beta = self.teacher_info.beta if self.teacher_info.role == "teacher" else args.beta
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Signals live on the ids both sides have (the tokenizer's); the student's padding rows, if
        # any, never enter a support it asks for.
        self.shared_vocab = self.teacher_info.model.shared_vocab
        vocab, max_k = self.shared_vocab, self.teacher_info.limits.max_k
        if args.support_k > min(vocab, max_k) or args.student_k > vocab:
            _warn_once(logger, "support_k=%d / student_k=%d exceed the vocabulary (%d) or the teacher's max_k (%d); "
                       "clamping", args.support_k, args.student_k, vocab, max_k)
            args.support_k, args.student_k = min(args.support_k, vocab, max_k), min(args.student_k, vocab)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._samples: dict[int, list[int]] | None = None  # record index -> offline sample (this rank's records)
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
            "layout": 2,  # 2: offline samples seeded per record, stored per plan item (samples-<j>.json)
            "student": model_fingerprint(str(getattr(self.model.config, "_name_or_path", ""))),
            "teacher": [self.teacher_info.model.model_hash,
                        self.teacher_info.reference.model_hash if self.teacher_info.reference else None],
            "beta": self.teacher_info.beta,
            "records": hashlib.sha256(json.dumps([vars(r) for r in self.records]).encode()).hexdigest(),
            "plan": self.plan,
            **{k: getattr(a, k) for k in ("method", "support", "support_k", "student_k", "sample_n",
                                          "sample_temperature", "value_dtype", "support_floor", "rollout_greedy",
                                          "rollout_temperature", "max_new_tokens", "seed")},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # -- data parallel --------------------------------------------------------------------------

    @property
    def my_items(self) -> range:
        """The plan items this rank trains on: accelerate hands rank r the items r, r + W, ..."""
        return range(self.rank, len(self.plan), self.world_size)

    @property
    def sharded(self) -> bool:
        """Parameters sharded across ranks (FSDP, DeepSpeed ZeRO-3): every forward is a collective."""
        from trl.distributed import DistributedBackend

        backend = DistributedBackend(self.accelerator)
        return backend.is_fsdp or backend.is_zero3

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.args.device), reduction="sum")
        return bool(total.item())

    @contextmanager
    def _generating(self):
        """The student to sample from (unwrapped, sharded parameters gathered), and `synced_gpus`."""
        with generation_model(self.model_wrapped, self.accelerator) as model:
            yield model, self.sharded and self.world_size > 1

    # -- offline samples ------------------------------------------------------------------------

    def _samples_path(self, j: int) -> Path | None:
        return self._cache / f"samples-{j}.json" if self._cache else None

    def _offline_samples(self) -> dict[int, list[int]]:
        """Student samples for this rank's records, drawn once from the initial student (and cached).

        Record i's sample is drawn from its own stream (seed * OFFLINE_SEED_STRIDE + i), so it does
        not depend on the number of processes or on which records share its batch. Each rank draws
        only the records of its own plan items; the cache holds one file per item.
        """
        if self._samples is None:
            mine = list(self.my_items)
            cached = {j: _read_json(self._samples_path(j)) for j in mine}
            todo = [j for j in mine if cached[j] is None]
            # With sharded parameters every rank must make the same generate calls: all or none.
            if self.sharded and self._any_rank(bool(todo)):
                todo = mine
            if len(todo) < len(mine):
                logger.info("reusing cached student samples for %d micro-batches", len(mine) - len(todo))
            if todo:
                logger.info("rank %d: sampling %d responses from the initial student (%d micro-batches)",
                            self.rank, sum(len(self.plan[j]) for j in todo), len(todo))
                # Whole micro-batches at a time, so every rank makes the same number of generate calls.
                step = max(1, SAMPLE_BATCH // self.args.per_device_train_batch_size)
                with self._generating() as (model, synced):
                    for start in range(0, len(todo), step):
                        chunk = todo[start : start + step]
                        records = [i for j in chunk for i in self.plan[j]]
                        drawn = generate_responses(
                            model, self.processing_class, [self.records[i].prompt for i in records],
                            max_new_tokens=self.args.max_new_tokens, do_sample=not self.args.rollout_greedy,
                            temperature=self.args.rollout_temperature, seed=self.args.seed,
                            row_seeds=[self.args.seed * OFFLINE_SEED_STRIDE + i for i in records],
                            batch_size=len(records), synced_gpus=synced,
                        )
                        for j in chunk:
                            cached[j], drawn = drawn[: len(self.plan[j])], drawn[len(self.plan[j]) :]
                            if self._cache:
                                _write_json(self._samples_path(j), cached[j])
            self._samples = {i: sample for j in mine for i, sample in zip(self.plan[j], cached[j])}
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
            with self._generating() as (model, synced):
                samples = generate_responses(
                    model, self.processing_class, prompts, max_new_tokens=self.args.max_new_tokens,
                    do_sample=not self.args.rollout_greedy, temperature=self.args.rollout_temperature,
                    seed=self.args.seed * 1_000_003 + j, synced_gpus=synced,
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
        scored = logits[batch.mask.to(device)][:, : self.shared_vocab]  # (P, V_shared): no padding rows
        top = scored.topk(self.args.student_k, dim=-1).indices.cpu()  # (P, k)
        return torch.cat([top, batch.targets[batch.mask][:, None]], dim=-1)

    def _support(self, j: int, indices: torch.Tensor | None) -> SupportSpec:
        """The support asked for plan item j (sampled supports draw with a seed of the run and the item)."""
        if self.args.support == "dense":
            return SupportSpec("dense")
        if self.args.support == "sampled":
            seed = (self.args.seed * 1_000_003 + j) % 2**63
            return SupportSpec("sampled", n=self.args.sample_n, seed=seed, temperature=self.args.sample_temperature)
        if indices is not None:
            return SupportSpec("indices", k=self.args.support_k, indices=indices)
        return SupportSpec("topk", k=self.args.support_k)

    def _fetch(self, j: int, staged: Staged) -> Prepared:
        """Runs on a worker thread: the teacher's signals for plan item j (or the cached ones).

        With support=indices the request holds the current student's top-k, so its answer is never
        cached: a later epoch, or a run with other hyperparameters, asks for other ids.
        """
        cacheable = self._cache is not None and self.args.support != "indices"
        path = self._cache / f"signals-{j}.pt" if cacheable else None
        if path is not None and path.exists():
            cached = torch.load(path, weights_only=False)
            return Prepared(staged.chosen, staged.other, cached["chosen"], cached["other"])
        a, spec = self.args, self.spec
        # One request for everything the method sends (y_w and y_l together for "pair").
        batches = {name: getattr(staged, name) for name in spec.teacher_batches}
        answer = self.teacher.score(
            [seq for b in batches.values() for seq in b.sequences], [r for b in batches.values() for r in b.ranges],
            signal=spec.signal, support=self._support(j, staged.indices), value_dtype=a.value_dtype,
            # Both models' log-probs: for the support floor, and for a sampled ADPA term's q / p ratio.
            include_logprobs=spec.signal == "advantage" and (a.support_floor is not None or a.support == "sampled"),
        )
        signals = dict(zip(batches, _split_signals(answer, list(batches.values()))))
        chosen_signals, other_signals = signals.get("chosen"), signals.get("other")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            torch.save({"chosen": chosen_signals, "other": other_signals}, tmp)
            tmp.replace(path)  # readers (a later run, another host) never see a partial file
        return Prepared(staged.chosen, staged.other, chosen_signals, other_signals)

    # -- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(
                self._stage, self._fetch, limit=len(self.plan), depth=self.args.prefetch,
                stride=self.accelerator.num_processes,
            )
        j = int(inputs["item"][0])
        if j % self.world_size != self.rank:
            raise RuntimeError(f"rank {self.rank} of {self.world_size} was handed plan item {j}: accelerate sharded "
                               "the data differently than planned (split_batches or dispatch_batches set?)")
        prepared = self.prefetcher.get(j)
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
        if "loss" in logs:  # every rank logs at the same steps, so the parts are averaged over all ranks
            names = [*self.spec.parts, *sorted(set(self._metrics) - set(self.spec.parts))]
            totals = torch.tensor([[sum(self._metrics[name]), len(self._metrics[name])] for name in names],
                                  dtype=torch.float64, device=self.args.device)
            if self.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update({name: total / count for name, (total, count) in zip(names, totals.tolist()) if count})
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.spec.uses_samples and self.args.rollout == "offline":
            if not self.sharded:
                self._offline_samples()  # from the initial student, before a checkpoint is loaded
            elif resume_from_checkpoint and self._any_rank(
                any(_read_json(self._samples_path(j)) is None for j in self.my_items)
            ):
                # Sharded, the student is sampled once it is wrapped (at the first step), which is after
                # the checkpoint is loaded: the initial student's samples must come from the cache.
                raise ValueError(
                    "resuming offline rollouts under FSDP / ZeRO-3 needs the first run's samples: pass the "
                    "--cache_dir it used (the initial student is gone once the checkpoint is loaded)"
                )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
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


_warned: set[tuple] = set()


def _warn_once(log: logging.Logger, message: str, *args) -> None:
    """A warning the first time it occurs in this process (a pipeline trains many students alike)."""
    if (message, args) not in _warned:
        _warned.add((message, args))
        log.warning(message, *args)


def _read_json(path: Path | None):
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def _fsdp_requested(args) -> bool:
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _refuse_fsdp_on_cpu(args) -> None:
    if _fsdp_requested(args) and args.device.type == "cpu":
        raise ValueError(
            "FSDP on CPU is not supported by the installed accelerate: it enables FSDP only on GPUs and other "
            "accelerators (CUDA, XPU, NPU, MLU, MUSA, HPU). On CPU its FSDP1 plugin fails ('There are currently "
            "no available devices found') and FSDP2 silently trains unsharded (DDP). Launch with the DDP config "
            "(training/accelerate/ddp.yaml) on CPU."
        )
