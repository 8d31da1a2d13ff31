"""Batching across callers: the sequences of concurrent requests share forward micro-batches.

Each request becomes a `Job` of sequences, forwarded as items: one sequence, or several that
share a prefix (`prefix.py`). With batching on, one worker thread per engine packs items from
every waiting job into micro-batches of at most `max_batch_tokens` padded tokens. Turns are
weighted by tokens (a deficit round-robin whose quantum is one item): the next item is always
the head of the waiting caller that has been served the fewest tokens so far (longest first
within a job), so a caller's share does not grow with the size of its items or requests, and a
huge request cannot starve small ones: its sequences are interleaved with theirs.

Trainers wait for an answer before they send the next request, so a caller with small requests
is away for a round trip after each answer; a scheduler that only looked at who is waiting would
hand those gaps to a caller with a large backlog, in micro-batches as large as the budget, and the
small caller's next request would then wait for them (measured: 50x the positions/s for one
trainer sending 64 long sequences beside seven sending 4 short ones, 3x with the gaps filled one
item at a time). So a caller counts as present while it waits, while its sequences are
forwarded, and for `hold_s` after an answer if it came back within `hold_s` the time before (a
trainer in a loop, as opposed to one that left or computes for long between requests). No caller
is served beyond the tokens of the least-served present one: when every waiting caller is ahead
of a present caller that is away, the worker waits for that caller's next request, `hold_s` at
most (anticipatory scheduling: the device idles for a round trip rather than give the gap to a
caller with a backlog). A caller that comes back (or a new one) starts level with the
least-served present caller: time away is not banked as credit.

The worker takes whatever is queued when it is free (more requests queue up while a forward
runs); `wait_s` optionally holds a micro-batch that is not full a little longer so more requests
can join it.

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
        hold_s: float = 0.0,
    ):
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.wait_s = wait_s
        self.observer = observer
        self.deterministic = deterministic
        self.hold_s = hold_s
        self._lock = threading.Lock()  # one forward at a time when batching is off
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Item]] = {}  # caller -> its waiting sequences
        # caller -> tokens served; kept while the caller is present (see the module's docstring), or
        # while it is ahead of the least-served present caller (it would come back there anyway)
        self._served: dict[str, int] = {}
        self._forwarding: dict[str, int] = {}  # caller -> its items in the running forward
        self._answered: dict[str, float] = {}  # caller -> time.monotonic() its last forward ended
        self._expected: dict[str, float] = {}  # caller -> how long after an answer it still counts as present
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
            if not queue:
                now = time.monotonic()
                # Back while held for: it keeps its count. Otherwise (new, or back after hold_s) it starts
                # level with the least-served present caller, or stays ahead of it.
                if job.caller not in self._present(now):
                    floor = self._least_present(now, but=job.caller)
                    self._served[job.caller] = max(self._served.get(job.caller, 0), floor or 0)
                if job.caller in self._answered and not self._forwarding.get(job.caller):
                    away = now - self._answered[job.caller]
                    self._expected[job.caller] = self.hold_s if away <= self.hold_s else 0.0
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
                while (pause := self._held_back(time.monotonic())) is not None:
                    self._cond.wait(pause)
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
            finally:
                with self._cond:
                    now = time.monotonic()
                    for item in group:
                        self._answered[item.job.caller] = now
                        self._forwarding[item.job.caller] -= 1
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

    def _present(self, now: float) -> Iterator[str]:
        """Callers waiting, being forwarded, or answered so recently that they are likely on their way back."""
        for caller in self._served:
            if (self._queues.get(caller) or self._forwarding.get(caller)
                    or now - self._answered.get(caller, now) < self._expected.get(caller, 0.0)):
                yield caller

    def _least_present(self, now: float, but: str | None = None) -> int | None:
        """Tokens served to the least-served present caller (other than `but`); None when none is."""
        return min((self._served[c] for c in self._present(now) if c != but), default=None)

    def _held_back(self, now: float) -> float | None:
        """When every waiting caller is ahead of a present caller that is away (answered, its next
        request expected): the seconds until the first of those is overdue; else None (go on)."""
        least = min((self._served[c] for c, q in self._queues.items() if q), default=None)
        if least is None:
            return None
        due = [self._answered.get(c, now) + self._expected.get(c, 0.0) - now for c in self._present(now)
               if not self._queues.get(c) and self._served[c] < least]
        return max(min(due), 0.0) if due else None

    def _take_group(self) -> list[Item]:
        """One micro-batch within max_batch_tokens padded tokens: item after item, the head of the
        waiting caller served the fewest tokens (ties: the caller waiting longest), while it is not
        ahead of the least-served present caller (beyond one item: `_held_back` let the first one go).
        O(callers) per item; callers are bounded by the requests admitted at once."""
        group: list[Item] = []
        size = GroupSize()
        now = time.monotonic()
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
            if group and (self.deterministic or size.with_item(item) > self.max_batch_tokens
                          or self._served[caller] > self._least_present(now)):
                break
            group.append(self._queues[caller].popleft())
            size.add(item)
            self._served[caller] += item.tokens
            self._forwarding[caller] = self._forwarding.get(caller, 0) + 1
        self._forget_idle(now)
        return group

    def _forget_idle(self, now: float) -> None:
        """Drop the queues of callers that wait no more, the counts of callers no longer present
        that are not ahead of the least-served present one (they would come back level with it),
        and answer times older than hold_s, so the bookkeeping stays as large as the callers that
        matter."""
        for caller in [c for c, q in self._queues.items() if not q]:
            del self._queues[caller]
        present = set(self._present(now))
        floor = min((self._served[c] for c in present), default=None)
        for caller in [c for c, n in self._served.items() if c not in present and (floor is None or n <= floor)]:
            del self._served[caller]
            self._forwarding.pop(caller, None)
        # When callers were last answered: kept hold_s (to measure how soon they come back), no longer.
        for caller in [c for c, t in self._answered.items() if now - t > self.hold_s and c not in self._served]:
            del self._answered[caller]
            self._expected.pop(caller, None)

    def _drop_stopped(self, queue: deque[Item]) -> None:
        while queue and queue[0].job.stopped():
            job = queue[0].job
            job.error = job.error or Cancelled("request cancelled or past its deadline")
            for q in self._queues.values():  # its other sequences, wherever they wait
                remaining = [item for item in q if item.job is not job]
                q.clear()
                q.extend(remaining)
            job.done.set()
