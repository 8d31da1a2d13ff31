"""Batching across callers: packing, fairness and cancellation of the scheduler, and answers that
do not depend on who else was in the batch."""

from __future__ import annotations

import threading

import pytest
import torch

from adpa.errors import Cancelled
from adpa.protocol import SupportSpec
from adpa.services.batching import Job, Scheduler
from adpa.services.engine import ScoringEngine


def _job(lengths, caller, *, should_stop=None):
    sequences = [torch.zeros(n, dtype=torch.long) for n in lengths]
    return Job(sequences, [(0, n) for n in lengths], lambda *a: None, should_stop, caller)


class GatedForward:
    """A forward that records its micro-batches and blocks the first one until released, so
    requests can queue up behind it deterministically."""

    def __init__(self):
        self.groups: list[list[tuple[str, int]]] = []
        self.jobs: list[list[Job]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, group):
        self.groups.append([(item.job.caller, item.width) for item in group])
        self.jobs.append([item.job for item in group])
        self.entered.set()
        self.release.wait(10)


def _run_async(scheduler, job, done: list, errors: list) -> threading.Thread:
    def target():
        try:
            scheduler.run(job)
            done.append(job.caller)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            errors.append((job.caller, err))

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_queued_requests_share_micro_batches_round_robin():
    forward = GatedForward()
    scheduler = Scheduler(forward, max_batch_tokens=64)
    done, errors = [], []
    threads = [_run_async(scheduler, _job([4], "first"), done, errors)]
    assert forward.entered.wait(5)
    # While the first forward runs, a big request and two small ones queue up.
    threads += [_run_async(scheduler, _job([8] * 20, "big"), done, errors)]
    threads += [_run_async(scheduler, _job([8, 8], name), done, errors) for name in ("a", "b")]
    while sum(len(q) for q in scheduler._queues.values()) < 24:
        threading.Event().wait(0.01)
    forward.release.set()
    for t in threads:
        t.join(10)
    assert not errors and sorted(done) == ["a", "b", "big", "first"]
    second = forward.groups[1]
    # Room for 8 sequences of 8: the small callers' sequences are in the first shared micro-batch,
    # interleaved with the big request's instead of waiting behind all of it; the big one gets no
    # more tokens than they do while their sequences are forwarded (they are still present).
    assert [c for c, _ in second] == ["big", "a", "b"] * 2 + ["big"]
    assert sum(len(g) for g in forward.groups) == 1 + 20 + 2 + 2


def test_a_callers_next_request_waits_behind_its_first():
    """A request that arrives while the same caller's previous one still waits joins that caller's
    queue, behind it: the caller keeps one place in the round-robin, not two."""
    forward = GatedForward()
    scheduler = Scheduler(forward, max_batch_tokens=64)
    done, errors = [], []
    threads = [_run_async(scheduler, _job([4], "first"), done, errors)]
    assert forward.entered.wait(5)
    first, then = _job([8, 8, 8], "a"), _job([8], "a")
    for job, queued in ((first, 3), (then, 4)):
        threads.append(_run_async(scheduler, job, done, errors))
        while len(scheduler._queues.get("a", ())) < queued:
            threading.Event().wait(0.01)
    threads.append(_run_async(scheduler, _job([8] * 4, "b"), done, errors))
    while sum(len(q) for q in scheduler._queues.values()) < 8:
        threading.Event().wait(0.01)
    forward.release.set()
    for t in threads:
        t.join(10)
    assert not errors and sorted(done) == ["a", "a", "b", "first"]
    assert [c for c, _ in forward.groups[1]] == ["a", "b"] * 4
    assert [job for job in forward.jobs[1] if job.caller == "a"] == [first, first, first, then]


def test_small_callers_finish_before_a_huge_request():
    forward = GatedForward()
    scheduler = Scheduler(forward, max_batch_tokens=32)
    done, errors = [], []
    threads = [_run_async(scheduler, _job([4], "first"), done, errors)]
    assert forward.entered.wait(5)
    threads.append(_run_async(scheduler, _job([8] * 200, "huge"), done, errors))
    while not scheduler._queues.get("huge"):
        threading.Event().wait(0.01)
    threads += [_run_async(scheduler, _job([8], f"small{i}"), done, errors) for i in range(3)]
    while sum(len(q) for q in scheduler._queues.values()) < 203:
        threading.Event().wait(0.01)
    forward.release.set()
    for t in threads:
        t.join(10)
    assert not errors and len(done) == 5
    # 32 padded tokens = 4 sequences of 8: the first shared micro-batch takes one sequence of each
    # caller, so every small caller is answered after one forward; the huge one needs 50 more
    # (its other 199 sequences, 4 at a time).
    assert sorted(c for c, _ in forward.groups[1]) == ["huge", "small0", "small1", "small2"]
    assert len(forward.groups) == 2 + 50


def test_a_cancelled_request_leaves_the_queue_and_the_others_are_served():
    forward = GatedForward()
    scheduler = Scheduler(forward, max_batch_tokens=64)
    done, errors = [], []
    stop = threading.Event()
    threads = [_run_async(scheduler, _job([4], "first"), done, errors)]
    assert forward.entered.wait(5)
    threads.append(_run_async(scheduler, _job([8] * 10, "gone", should_stop=stop.is_set), done, errors))
    threads.append(_run_async(scheduler, _job([8] * 3, "stays"), done, errors))
    while sum(len(q) for q in scheduler._queues.values()) < 13:
        threading.Event().wait(0.01)
    stop.set()
    forward.release.set()
    for t in threads:
        t.join(10)
    assert sorted(done) == ["first", "stays"]
    assert [c for c, _ in errors] == ["gone"] and isinstance(errors[0][1], Cancelled)
    assert all(caller != "gone" for group in forward.groups for caller, _ in group)


class RecordingForward(GatedForward):
    """GatedForward that also counts the tokens each caller was served, micro-batch by micro-batch."""

    def __init__(self):
        super().__init__()
        self.tokens: list[dict[str, int]] = []  # per micro-batch: caller -> tokens

    def __call__(self, group):
        served: dict[str, int] = {}
        for item in group:
            served[item.job.caller] = served.get(item.job.caller, 0) + item.tokens
        self.tokens.append(served)
        super().__call__(group)


def _queue_behind_a_gate(scheduler, forward, jobs) -> list[threading.Thread]:
    """Start `jobs` while a first forward is held, so they all wait; returns the threads (released)."""
    done, errors = [], []
    threads = [_run_async(scheduler, _job([4], "first"), done, errors)]
    assert forward.entered.wait(5)
    threads += [_run_async(scheduler, job, done, errors) for job in jobs]
    expected = 1 + sum(len(job.sequences) for job in jobs)
    while sum(len(q) for q in scheduler._queues.values()) < expected - 1:
        threading.Event().wait(0.01)
    forward.release.set()
    for t in threads:
        t.join(10)
    assert not errors and len(done) == 1 + len(jobs)
    return threads


def test_unequal_callers_get_equal_tokens_while_they_wait():
    """One caller with long sequences beside seven with short ones: while all of them wait, each
    has been served the same tokens to within one long sequence (turns one item each would give
    the long caller 4x the others)."""
    forward = RecordingForward()
    scheduler = Scheduler(forward, max_batch_tokens=96)
    jobs = [_job([32] * 64, "long")] + [_job([8] * 64, f"short{i}") for i in range(7)]
    _queue_behind_a_gate(scheduler, forward, jobs)
    served = dict.fromkeys(["long"] + [f"short{i}" for i in range(7)], 0)
    for batch in forward.tokens[1:]:
        for caller, tokens in batch.items():
            served[caller] += tokens
        if any(served[c] == 8 * 64 for c in served if c.startswith("short")):
            break  # a short caller is done: the window where everyone waits is over
    assert max(served.values()) - min(served.values()) <= 32, served
    assert sum(len(g) for g in forward.groups) == 1 + 64 * 8


def test_a_caller_back_from_a_pause_does_not_bank_credit():
    """A caller that joins late starts level with the least-served waiting caller: it then shares
    the forwards with the one that waited all along, instead of taking every forward to catch up."""
    permits = threading.Semaphore(0)  # one per forward: the test decides how many run
    tokens: list[dict[str, int]] = []

    def forward(group):
        permits.acquire(timeout=10)
        tokens.append({})
        for item in group:
            tokens[-1][item.job.caller] = tokens[-1].get(item.job.caller, 0) + item.tokens

    scheduler = Scheduler(forward, max_batch_tokens=16)
    done, errors = [], []
    threads = [_run_async(scheduler, _job([8] * 40, "early"), done, errors)]
    for _ in range(10):  # "early" alone for 10 forwards of 2 sequences
        permits.release()
    while len(tokens) < 10:
        threading.Event().wait(0.001)
    threads.append(_run_async(scheduler, _job([8] * 10, "late"), done, errors))
    while len(scheduler._queues.get("late", ())) < 10:
        threading.Event().wait(0.001)
    for _ in range(100):
        permits.release()
    for t in threads:
        t.join(10)
    assert not errors and sorted(done) == ["early", "late"]
    # The 11th forward was taken before "late" came; from the 12th on, each forward is shared.
    assert tokens[11:16] == [{"early": 8, "late": 8}] * 5, tokens


def test_a_trainer_in_a_loop_is_waited_for_not_overtaken():
    """A caller with a backlog beside one that sends a small request as soon as the last is answered:
    the worker waits out the small caller's round trip instead of giving it to the backlog, so both
    get the same tokens (one item apart), not a micro-batch of the backlog per small request."""
    tokens: list[dict[str, int]] = []

    def forward(group):
        threading.Event().wait(0.002)
        tokens.append({})
        for item in group:
            tokens[-1][item.job.caller] = tokens[-1].get(item.job.caller, 0) + item.tokens

    scheduler = Scheduler(forward, max_batch_tokens=1024, hold_s=1.0)
    done, errors = [], []
    threads = [_run_async(scheduler, _job([32] * 400, "backlog"), done, errors)]
    for _ in range(8):  # round trips of 20 ms, ten times a forward
        scheduler.run(_job([8] * 4, "loop"))
        threading.Event().wait(0.02)
    served_before = [dict(batch) for batch in tokens]
    scheduler.run(_job([8] * 4, "loop"))
    for t in threads:
        t.join(20)
    assert not errors and done == ["backlog"]
    # From the second round trip on (the first one tells that the caller comes back), the backlog
    # is held level with the looping caller.
    second_request = [i for i, batch in enumerate(served_before) if batch.get("loop")][1]
    window = served_before[second_request:]
    backlog, loop = (sum(b.get(c, 0) for b in window) for c in ("backlog", "loop"))
    assert loop == 7 * 32 and backlog <= loop + 32, (backlog, loop)


def test_callers_that_left_are_forgotten():
    """The scheduler's bookkeeping follows the callers present, not every caller ever seen."""
    scheduler = Scheduler(lambda group: None, max_batch_tokens=64, hold_s=0.01)
    for i in range(200):
        scheduler.run(_job([8, 4], f"caller{i}"))
    threading.Event().wait(0.05)
    scheduler.run(_job([8], "last"))
    assert len(scheduler._served) <= 2 and len(scheduler._answered) <= 2 and not scheduler._queues


def test_deterministic_scheduler_forwards_one_item_at_a_time():
    forward = RecordingForward()
    scheduler = Scheduler(forward, max_batch_tokens=1024, deterministic=True)
    _queue_behind_a_gate(scheduler, forward, [_job([8, 30, 5], "a"), _job([12] * 3, "b")])
    assert [len(g) for g in forward.groups] == [1] * 7


# -- the real engine: answers with batching on equal the answers alone --------------------------


@pytest.fixture(scope="module")
def engines(teacher_path):
    alone = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32", batching=False)
    # A long wait window so that concurrent calls surely meet in one micro-batch.
    batched = ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32", batch_wait_s=1.0)
    return alone, batched


def _concurrently(engine, calls):
    results = [None] * len(calls)
    batches = []
    engine.scheduler.observer = lambda jobs, sequences, tokens: batches.append(jobs)

    def run(i, seqs, ranges, spec):
        results[i] = engine.score(seqs, ranges, spec, caller=f"caller{i}")

    threads = [threading.Thread(target=run, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.scheduler.observer = None
    return results, batches


def _calls(lengths_per_caller, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = [SupportSpec("topk", k=5), SupportSpec("sampled", n=6, seed=3), SupportSpec("dense"), None]
    calls = []
    for i, lengths in enumerate(lengths_per_caller):
        seqs = [torch.randint(7, 77, (n,), generator=g) for n in lengths]
        ranges = [(1, n) for n in lengths]
        spec = specs[i % len(specs)]
        if spec is None:
            spec = SupportSpec("indices", k=2, indices=torch.randint(-1, 77, (sum(n - 1 for n in lengths), 3), generator=g))
        calls.append((seqs, ranges, spec))
    return calls


def test_equal_lengths_batch_bit_identically(engines):
    alone, batched = engines
    calls = _calls([[24, 24], [24], [24, 24, 24], [24]])
    expected = [alone.score(*call) for call in calls]
    results, batches = _concurrently(batched, calls)
    assert max(batches) == len(calls)  # one micro-batch held every caller's sequences
    for got, want in zip(results, expected):
        assert torch.equal(got.logprobs, want.logprobs)
        if want.indices is not None:
            assert torch.equal(got.indices, want.indices)
        if want.weights is not None:
            assert torch.equal(got.weights, want.weights)


def test_mixed_lengths_batch_within_fp32_round_off(engines):
    """Padding to a longer companion changes attention's tiling: values move in the last bits only."""
    alone, batched = engines
    calls = _calls([[9, 30], [17], [5, 12, 40], [26]])
    expected = [alone.score(*call) for call in calls]
    results, batches = _concurrently(batched, calls)
    assert max(batches) > 1
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
        assert got.logprobs.shape == want.logprobs.shape
        if want.indices is not None and got.weights is None:
            assert torch.equal(got.indices, want.indices)


@pytest.fixture(scope="module")
def deterministic_engine(teacher_path):
    return ScoringEngine.from_pretrained(str(teacher_path), device="cpu", dtype="float32", deterministic=True)


def test_deterministic_answers_equal_alone_bit_for_bit(deterministic_engine, engines):
    """Mixed lengths, with a request whose sequences share a prefix: with `deterministic` every
    answer is the lone answer bit for bit, where the default batching differs in the last bits."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(7, 77, (20,), generator=g)
    shared = [torch.cat([prompt, torch.randint(7, 77, (n,), generator=g)]) for n in (6, 11)]
    calls = _calls([[9, 30], [17], [5, 12, 40], [26], [3, 33]], seed=1)
    calls.append((shared, [(1, len(s)) for s in shared], SupportSpec("topk", k=5)))
    alone, batched = engines
    for engine, lone, identical in ((deterministic_engine, deterministic_engine, True), (batched, alone, False)):
        expected = [lone.score(*call) for call in calls]  # (`batched` alone would wait its 1 s per call)
        results, batches = _concurrently(engine, calls)
        if identical:
            assert max(batches) == 1  # one request's item per forward
        else:
            assert max(batches) > 1
        same = [torch.equal(got.logprobs, want.logprobs) for got, want in zip(results, expected)]
        assert all(same) if identical else not all(same), same
        for got, want in zip(results, expected):
            if identical and want.indices is not None:
                assert torch.equal(got.indices, want.indices)


def test_serve_settings_reach_the_schedulers(teacher_path, reference_path):
    """`deterministic` and `turn_hold_ms` of ServeConfig reach the teacher's engine and its in-process
    reference (which never holds turns: its requests come through the teacher's fair queue)."""
    from adpa.services.config import ServeConfig
    from adpa.services.factory import connect_reference, load_engine

    config = ServeConfig(role="teacher", model=str(teacher_path), reference=str(reference_path), device="cpu",
                         deterministic=True, turn_hold_ms=250)
    teacher, reference = load_engine(config, config.model), connect_reference(config).engine
    assert teacher.scheduler.deterministic and reference.scheduler.deterministic
    assert teacher.scheduler.hold_s == 0.25 and reference.scheduler.hold_s == 0.0
