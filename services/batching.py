"""Batching across callers: the sequences of concurrent requests share forward micro-batches.

Each request becomes a `Job` of sequences. With batching on, one worker thread per engine packs
sequences from every waiting job into micro-batches of at most `max_batch_tokens` padded tokens,
taking them round-robin by caller (one sequence per caller per turn, longest first within a job),
so a caller with a huge request cannot starve the small ones: its sequences are interleaved with
theirs, a micro-batch at a time. The worker takes whatever is queued when it is free (more
requests queue up while a forward runs); `wait_s` optionally holds a micro-batch that is not
full a little longer so more requests can join it.

With batching off, each request's sequences are forwarded in the caller's thread, one request
at a time (`max_batch_tokens` still bounds a micro-batch).

A padded micro-batch computes a sequence's rows with other companions than it would have alone;
with fp32 attention kernels that tile by the padded length, values can differ in the last bits
(log-probs within ~4e-6 measured on CPU with SDPA attention). Sequences of equal length batch
together bit-identically (the batch dimension does not change their arithmetic).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from adpa.errors import Cancelled

StopFn = Callable[[], bool]


@dataclass(eq=False)
class Job:
    """One request's sequences inside the engine; `add` receives its scored rows as they are computed."""

    sequences: list[torch.Tensor]
    ranges: list[tuple[int, int]]
    add: Callable[[int, int, torch.Tensor], None]  # (sequence index, first row of its range, rows)
    should_stop: StopFn | None = None
    caller: str = ""
    pending: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    def stopped(self) -> bool:
        return self.error is not None or (self.should_stop is not None and self.should_stop())


@dataclass(frozen=True)
class Item:
    """One sequence of a job."""

    job: Job
    index: int

    @property
    def length(self) -> int:
        return len(self.job.sequences[self.index])


ForwardFn = Callable[[list[Item]], None]
BatchObserver = Callable[[int, int, int], None]  # (jobs, sequences, padded tokens) of one micro-batch


def longest_first(job: Job) -> list[Item]:
    lengths = job.lengths
    return [Item(job, b) for b in sorted(range(len(lengths)), key=lambda i: -lengths[i])]


def plan_micro_batches(items: list[Item], max_batch_tokens: int) -> Iterator[list[Item]]:
    """Consecutive groups of `items` with at most max_batch_tokens padded tokens (a longer one alone)."""
    group: list[Item] = []
    width = 0
    for item in items:
        w = max(width, item.length)
        if group and (len(group) + 1) * w > max_batch_tokens:
            yield group
            group, w = [], item.length
        group.append(item)
        width = w
    if group:
        yield group


class Scheduler:
    """Runs jobs through `forward(micro_batch)`, batching concurrent jobs when `batching` is on."""

    def __init__(
        self, forward: ForwardFn, *, max_batch_tokens: int, batching: bool = True, wait_s: float = 0.0,
        name: str = "adpa-batcher",
    ):
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.wait_s = wait_s
        self.observer: BatchObserver | None = None
        self._lock = threading.Lock()  # one forward at a time when batching is off
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Item]] = {}  # caller -> its waiting sequences
        self._turn = itertools.count()
        self._worker: threading.Thread | None = None
        self._name = name

    def run(self, job: Job) -> None:
        """Forward every sequence of `job`; returns when all its rows were added, or raises."""
        job.pending = len(job.sequences)
        if not job.sequences:
            return
        if not self.batching:
            with self._lock:
                for group in plan_micro_batches(longest_first(job), self.max_batch_tokens):
                    if job.stopped():
                        raise Cancelled("request cancelled or past its deadline")
                    self._forward(group)
            return
        with self._cond:
            self._queues.setdefault(job.caller, deque()).extend(longest_first(job))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._worker.start()
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error

    # -- the worker ---------------------------------------------------------------------------

    def _forward(self, group: list[Item]) -> None:
        self.forward(group)
        if self.observer is not None:
            jobs = len({item.job for item in group})
            self.observer(jobs, len(group), len(group) * max(item.length for item in group))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not any(self._queues.values()):
                    self._cond.wait()
                if self.wait_s > 0:
                    self._wait_for_company()
                group = self._take_group()
            if not group:
                continue
            try:
                self._forward(group)
            except BaseException as err:  # the jobs in this group fail; the worker goes on
                for job in {item.job for item in group}:
                    job.error = job.error or err
                    job.done.set()
                continue
            for item in group:
                item.job.pending -= 1
                if item.job.pending == 0:
                    item.job.done.set()

    def _wait_for_company(self) -> None:
        """Hold a micro-batch that is not full for up to wait_s, so more requests can join it."""
        deadline = time.monotonic() + self.wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            queued = [item for q in self._queues.values() for item in q]
            if len(queued) * max(item.length for item in queued) >= self.max_batch_tokens:
                return
            self._cond.wait(remaining)

    def _take_group(self) -> list[Item]:
        """One micro-batch, one sequence per caller per turn, within max_batch_tokens padded tokens."""
        callers = [c for c, q in self._queues.items() if q]
        if not callers:
            return []
        start = next(self._turn) % len(callers)
        order = callers[start:] + callers[:start]
        group: list[Item] = []
        width = 0
        while True:
            took = False
            for caller in order:
                queue = self._queues[caller]
                self._drop_stopped(queue)
                if not queue:
                    continue
                w = max(width, queue[0].length)
                if group and (len(group) + 1) * w > self.max_batch_tokens:
                    return group
                group.append(queue.popleft())
                width, took = w, True
            if not took:
                for caller in [c for c, q in self._queues.items() if not q]:
                    del self._queues[caller]
                return group

    def _drop_stopped(self, queue: deque[Item]) -> None:
        while queue and queue[0].job.stopped():
            job = queue[0].job
            job.error = job.error or Cancelled("request cancelled or past its deadline")
            for q in self._queues.values():  # its other sequences, wherever they wait
                remaining = [item for item in q if item.job is not job]
                q.clear()
                q.extend(remaining)
            job.done.set()
