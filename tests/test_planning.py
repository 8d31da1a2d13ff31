"""The cost of planning micro-batches follows the request's size: linear, never quadratic.

Counted, not timed: the planner's reads of item sizes (`Item.rows`, `Item.width`) per item must
not grow with the number of items (recomputing a group's padded size per added item made them
grow with the group, and 8,192 two-token sequences spent 42 s in planning).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from adpa.cli import main as cli_main
from adpa.errors import DeadlineExceeded, Unavailable
from adpa.protocol import SupportSpec
from adpa.services import batching
from adpa.services.batching import Job, Scheduler, longest_first, plan_micro_batches
from adpa.services.remote_reference import RemoteReference

READS = {"n": 0}


@dataclass(frozen=True, eq=False)
class CountingItem(batching.Item):
    """An Item that counts every read of its sizes."""

    @property
    def rows(self) -> int:
        READS["n"] += 1
        return len(self.indices)

    @property
    def width(self) -> int:
        READS["n"] += 1
        return max(len(self.job.sequences[b]) for b in self.indices)


def _two_token_job(n: int, caller: str = "") -> Job:
    sequences = [torch.tensor([1, 2])] * n
    return Job(sequences, [(1, 2)] * n, lambda *a: None, caller=caller)


def _reads_per_item(plan, n: int) -> float:
    READS["n"] = 0
    plan(n)
    return READS["n"] / n


def _plan_alone(n: int) -> None:
    items = [CountingItem(item.job, item.indices) for item in longest_first(_two_token_job(n))]
    assert sum(len(group) for group in plan_micro_batches(items, 8192)) == n


def _schedule(n: int, batching_on: bool) -> None:
    forwarded = []
    scheduler = Scheduler(lambda group: forwarded.append(len(group)), max_batch_tokens=8192, batching=batching_on)
    scheduler.run(_two_token_job(n, "a"))
    assert sum(forwarded) == n


@pytest.mark.parametrize("plan", [_plan_alone, lambda n: _schedule(n, False), lambda n: _schedule(n, True)],
                         ids=["plan_micro_batches", "scheduler", "batching_scheduler"])
def test_planning_work_per_item_does_not_grow_with_the_request(plan, monkeypatch):
    monkeypatch.setattr(batching, "Item", CountingItem)  # what longest_first builds
    small, large = _reads_per_item(plan, 512), _reads_per_item(plan, 16384)
    # Linear planning reads each item's sizes a few times; the quadratic read the whole group's
    # (up to 4,096 items of 2 tokens in an 8,192-token micro-batch) for every added item.
    assert large <= 1.5 * small + 1, (small, large)
    assert large < 16, large


class _FakeClient:
    """Stands for the reference's TeacherClient: records the timeout, answers with `error`."""

    def __init__(self, error: grpc.StatusCode):
        self.error = error
        self.timeouts: list[float | None] = []

    def score(self, *args, timeout=None, **kwargs):
        self.timeouts.append(timeout)
        err = grpc.RpcError()
        err.code = lambda: self.error
        err.details = lambda: "stub"
        raise err


def _ask(client: _FakeClient, deadline: float | None) -> None:
    support = SupportSpec("indices", k=0, indices=torch.tensor([[1]]))
    RemoteReference(client).score([torch.tensor([1, 2])], [(1, 2)], support, deadline=deadline)


def test_reference_call_carries_the_remaining_deadline_and_a_timeout_is_not_retryable():
    client = _FakeClient(grpc.StatusCode.DEADLINE_EXCEEDED)
    with pytest.raises(DeadlineExceeded):  # DEADLINE_EXCEEDED to the caller, whose client does not retry it
        _ask(client, time.monotonic() + 5.0)
    assert 4.0 < client.timeouts[0] <= 5.0
    with pytest.raises(DeadlineExceeded):  # already past: the reference is not asked at all
        _ask(client, time.monotonic() - 1.0)
    assert len(client.timeouts) == 1
    with pytest.raises(Unavailable):  # the reference down stays UNAVAILABLE (another replica may answer)
        _ask(_FakeClient(grpc.StatusCode.UNAVAILABLE), None)


def test_the_planning_benchmark_reports_time_per_sequence(tmp_path):
    out = tmp_path / "planning.json"
    assert cli_main(["bench", "planning", "--sizes", "256,1024", "--repeats", "1", "--no-request", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["sequences"] for r in doc["planning"]] == [256, 1024] and doc["request"] is None
    assert all(r["plan_us_per_sequence"] > 0 and r["scheduler_us_per_sequence"] > 0 for r in doc["planning"])
