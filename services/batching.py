"""Batching across callers: the sequences of concurrent requests share forward micro-batches.

Each request becomes a `Job` of sequences, forwarded as items: one sequence, or several that
share a prefix (`prefix.py`). With batching on, one worker thread per engine packs items from
every waiting job into micro-batches of at most `max_batch_tokens` padded tokens. Turns are
weighted by tokens (a deficit round-robin whose quantum is one item): the next item is always
the head of the waiting caller that has been served the fewest tokens so far (longest first
within a job). A caller sending 64 long sequences per request and one sending 4 short ones get
the same tokens per second while both wait, so a caller's share does not grow with the size of
its requests, and a huge request cannot starve small ones: its sequences are interleaved with
theirs, a micro-batch at a time. A caller that starts waiting again after a pause starts level
with the least-served waiting caller: time away is not banked as credit. The worker takes
whatever is queued when it is free (more requests queue up while a forward runs); `wait_s`
optionally holds a micro-batch that is not full a little longer so more requests can join it.

With batching off, each request's sequences are forwarded in the caller's thread, one request
at a time (`max_batch_tokens` still bounds a micro-batch).

A padded micro-batch computes a sequence's rows with other companions than it would have alone;
with fp32 attention kernels that tile by the padded length, values can differ in the last bits
(log-probs within ~4e-6 measured on CPU with SDPA attention), and matrix products may take other
kernels for another number of rows. With `deterministic`, every micro-batch is one item (one
sequence, or the sequences of one request that share a prefix): its arithmetic is then fixed
by the request alone, so each answer is bit-identical to the same request sent alone, whatever
else is queued, at the price of smaller forwards.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from adpa.errors import Cancelled

StopFn = Callable[[], bool]


@dataclass(eq=False)
class Job:
    """One request's sequences inside the engine; `add` receives its scored rows as they are computed."""

    sequences: list[torch.Tensor]
    ranges: list[tuple[int, int]]
    add: Callable[[torch.Tensor, torch.Tensor], None]  # (row numbers in request order, (rows, V) log-probs)
    should_stop: StopFn | None = None
    caller: str = ""
    groups: list[tuple[tuple[int, ...], int]] = field(default_factory=list)  # shared prefixes (prefix.py)
    pending: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # first_row[b]: the request row of sequence b's first scored position (rows in request order)
        self.first_row = [0]
        for start, end in self.ranges:
            self.first_row.append(self.first_row[-1] + end - start)

    def stopped(self) -> bool:
        return self.error is not None or (self.should_stop is not None and self.should_stop())


@dataclass(frozen=True, eq=False)
class Item:
    """What is forwarded together: one sequence of a job, or several that share their first
    `prefix` tokens (the prefix is computed once)."""

    job: Job
    indices: tuple[int, ...]
    prefix: int = 0

    @property
    def rows(self) -> int:
        return len(self.indices)

    @cached_property
    def width(self) -> int:
        # Cached: the planner reads it once per item, but tests and observers read it again.
        return max(len(self.job.sequences[b]) for b in self.indices)

    @cached_property
    def tokens(self) -> int:
        """The tokens this item forwards (a shared prefix once): what a caller's share is counted in."""
        return sum(len(self.job.sequences[b]) for b in self.indices) - self.prefix * (self.rows - 1)


ForwardFn = Callable[[list[Item]], None]
BatchObserver = Callable[[int, int, int], None]  # (jobs, sequences, padded tokens) of one micro-batch


def padded_tokens(items: list[Item]) -> int:
    """The micro-batch's size as the budget counts it: rows x the longest (an upper bound for
    items with a shared prefix, whose prefix is forwarded once)."""
    return sum(item.rows for item in items) * max(item.width for item in items)


class GroupSize:
    """`padded_tokens` of a growing micro-batch, kept as running sums: rows and the widest item.

    `with_item(item)` = (rows + item.rows) * max(width, item.width) is O(1), so planning n items
    costs O(n) (recomputing `padded_tokens([*group, item])` per item made it O(n^2)).
    """

    __slots__ = ("rows", "width")

    def __init__(self) -> None:
        self.rows = 0
        self.width = 0

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    def with_item(self, item: Item) -> int:
        return (self.rows + item.rows) * max(self.width, item.width)

    def add(self, item: Item) -> None:
        self.rows += item.rows
        self.width = max(self.width, item.width)


def longest_first(job: Job) -> list[Item]:
    """The job's items (its shared-prefix groups, then one per remaining sequence), widest first."""
    grouped = {b for indices, _ in job.groups for b in indices}
    items = [Item(job, indices, prefix) for indices, prefix in job.groups]
    items += [Item(job, (b,)) for b in range(len(job.sequences)) if b not in grouped]
    return sorted(items, key=lambda item: -item.width)


def plan_micro_batches(items: list[Item], max_batch_tokens: int, *, one_item: bool = False) -> Iterator[list[Item]]:
    """Consecutive groups of `items` within max_batch_tokens padded tokens (a larger item alone);
    with `one_item`, every item alone."""
    group: list[Item] = []
    size = GroupSize()
    for item in items:
        if group and (one_item or size.with_item(item) > max_batch_tokens):
            yield group
            group, size = [], GroupSize()
        group.append(item)
        size.add(item)
    if group:
        yield group


class Scheduler:
    """Runs jobs through `forward(micro_batch)`, batching concurrent jobs when `batching` is on;
    with `deterministic`, every micro-batch holds one item (answers independent of companions)."""

    def __init__(
        self, forward: ForwardFn, *, max_batch_tokens: int, batching: bool = True, wait_s: float = 0.0,
        name: str = "adpa-batcher", observer: BatchObserver | None = None, deterministic: bool = False,
    ):
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.wait_s = wait_s
        self.observer = observer
        self.deterministic = deterministic
        self._lock = threading.Lock()  # one forward at a time when batching is off
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Item]] = {}  # caller -> its waiting sequences
        # caller -> tokens served while it waits (and while others wait after it left, if it is ahead)
        self._served: dict[str, int] = {}
        self._worker: threading.Thread | None = None
        self._name = name

    def run(self, job: Job) -> None:
        """Forward every sequence of `job`; returns when all its rows were added, or raises."""
        items = longest_first(job)
        job.pending = len(items)
        if not items:
            return
        if not self.batching:
            with self._lock:
                for group in plan_micro_batches(items, self.max_batch_tokens, one_item=self.deterministic):
                    if job.stopped():
                        raise Cancelled("request cancelled or past its deadline")
                    self._forward(group)
            return
        with self._cond:
            queue = self._queues.get(job.caller)
            if not queue:  # (re)joins level with the least-served waiting caller, or stays ahead of it
                self._served[job.caller] = max(self._served.get(job.caller, 0), self._least_served())
                queue = self._queues.setdefault(job.caller, deque())
            queue.extend(items)
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
            self.observer(jobs, sum(item.rows for item in group), padded_tokens(group))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not any(self._queues.values()):
                    self._cond.wait()
                if self.wait_s > 0 and not self.deterministic:  # one item per forward: no company to wait for
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
            if self._queued_fill_a_batch():
                return
            self._cond.wait(remaining)

    def _queued_fill_a_batch(self) -> bool:
        """Whether the queued items add up to max_batch_tokens padded tokens; reads only as many
        items as that takes (one micro-batch), not every queued one."""
        size = GroupSize()
        for queue in self._queues.values():
            for item in queue:
                size.add(item)
                if size.tokens >= self.max_batch_tokens:
                    return True
        return False

    def _least_served(self) -> int:
        """Tokens served to the least-served caller that is waiting (0 when none waits)."""
        return min((self._served[c] for c, q in self._queues.items() if q), default=0)

    def _take_group(self) -> list[Item]:
        """One micro-batch within max_batch_tokens padded tokens: item after item, the head of the
        waiting caller served the fewest tokens (ties: the caller waiting longest), so callers get
        equal tokens whatever the size of their items. O(callers) per item; callers are bounded by
        the requests admitted at once."""
        group: list[Item] = []
        size = GroupSize()
        while True:
            waiting = []
            for caller, queue in self._queues.items():
                self._drop_stopped(queue)
                if queue:
                    waiting.append(caller)
            if not waiting:
                break
            caller = min(waiting, key=self._served.__getitem__)
            item = self._queues[caller][0]
            if group and (self.deterministic or size.with_item(item) > self.max_batch_tokens):
                break
            group.append(self._queues[caller].popleft())
            size.add(item)
            self._served[caller] += item.tokens
        self._forget_idle()
        return group

    def _forget_idle(self) -> None:
        """Drop callers that wait no more: their queues, and their counts when no more than the
        least-served waiting caller's (they would rejoin level with it anyway), so the counts stay
        as many as the callers that matter."""
        for caller in [c for c, q in self._queues.items() if not q]:
            del self._queues[caller]
        floor = self._least_served() if self._queues else None
        for caller in [c for c, n in self._served.items() if c not in self._queues and (floor is None or n <= floor)]:
            del self._served[caller]

    def _drop_stopped(self, queue: deque[Item]) -> None:
        while queue and queue[0].job.stopped():
            job = queue[0].job
            job.error = job.error or Cancelled("request cancelled or past its deadline")
            for q in self._queues.values():  # its other sequences, wherever they wait
                remaining = [item for item in q if item.job is not job]
                q.clear()
                q.extend(remaining)
            job.done.set()
