"""A lookahead queue: teacher signals for the next micro-batches are fetched while this one trains.

Items are numbered; the trainer asks for item j and the prefetcher makes sure items
j + stride, ..., j + depth * stride (the ones this rank will ask for next) are in flight.
`stage` runs in the caller's thread when an item is submitted (e.g. sampling from the student,
which must see the current weights); `fetch` runs on a worker thread (the teacher RPC).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")


class Prefetcher(Generic[S, T]):
    def __init__(
        self,
        stage: Callable[[int], S],
        fetch: Callable[[int, S], T],
        *,
        limit: int,
        depth: int = 1,
        stride: int = 1,
    ):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.stage, self.fetch = stage, fetch
        self.limit, self.depth, self.stride = limit, depth, stride
        self._pool = ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="adpa-prefetch")
        self._inflight: dict[int, Future] = {}

    def get(self, j: int) -> T:
        """Item j (computed now if it was not prefetched); then queue the next `depth` items."""
        future = self._inflight.pop(j, None)
        if future is None:
            result = self.fetch(j, self.stage(j))
        # Items before j will never be asked for (e.g. skipped on resume): drop them.
        for stale in [k for k in self._inflight if k < j]:
            self._inflight.pop(stale).cancel()
        for step in range(1, self.depth + 1):
            k = j + step * self.stride
            if k < self.limit and k not in self._inflight:
                self._inflight[k] = self._pool.submit(self.fetch, k, self.stage(k))
        return future.result() if future is not None else result

    def close(self) -> None:
        for future in self._inflight.values():
            future.cancel()
        self._inflight.clear()
        self._pool.shutdown(wait=True)
