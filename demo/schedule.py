"""Where and when the demo's trainings run: one at a time in this process (`jobs: 1`), or on
`jobs` worker processes that start as soon as what a training reads is ready.

A run's result does not depend on the schedule: the tables of both are the same, bit for bit.
"""

from __future__ import annotations

import atexit
import gc
import logging
import logging.handlers
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from adpa.demo.config import DemoConfig
from adpa.demo.stage0 import STAGE0, services_ready, train_stage0, train_teachers

if TYPE_CHECKING:
    from adpa.demo.pipeline import DemoRun

# Student methods that read neither a teacher model nor the services (with jobs > 1 they can train
# while the teachers do), and those that read the teacher's weights but not the services.
TEACHER_FREE = ("dpo", "simpo")
TEACHER_WEIGHTS_ONLY = ("seqkd",)


def train_sequential(run: DemoRun, seeds: int, fixed: dict[str, dict | None], stack: ExitStack) -> dict[str, dict]:
    """Stage 0, then every method, one training at a time in this process."""
    run.prepare()
    with tqdm(total=len(STAGE0), desc="stage 0", unit="model") as bar:
        services = train_teachers(run, stack, bar)
        student_threads(run.config)
        bar.set_postfix_str("student SFT")
        train_stage0(run, "student SFT")  # while the services load
        bar.update()
    endpoints = services_ready(services)
    with tqdm(total=planned_runs(run, seeds, fixed), desc="student methods", unit="run") as bar:
        progress = Progress(bar.set_postfix_str, bar.update, lambda n: _grow(bar, n))
        trained: dict[str, dict] = {}
        for name in [n for n in fixed if not sources(run.config, n)] + [n for n in fixed if sources(run.config, n)]:
            setting, starts = derived_inputs(run.config, name, fixed[name], trained)
            trained[name] = run.train_method_all(name, seeds, endpoints, setting, progress, starts)
        return {name: trained[name] for name in fixed}


def sources(config: DemoConfig, name: str) -> list[str]:
    """The methods a method waits for: the one it starts from and the one whose setting it takes."""
    method = config.methods[name]
    return [s for s in (method.init_from, method.settings_from) if s]


def derived_inputs(config: DemoConfig, name: str, setting: dict | None,
                   trained: dict[str, dict]) -> tuple[dict | None, list[Path] | None]:
    """A method's setting and starting students, once its sources' rows are in `trained`: `settings_from`
    gives the source's chosen setting (unless one is fixed already), `init_from` the source's students."""
    method = config.methods[name]
    if setting is None and method.settings_from:
        setting = trained[method.settings_from]["setting"]
    starts = [Path(m) for m in trained[method.init_from]["models"]] if method.init_from else None
    return setting, starts


def train_parallel(run: DemoRun, seeds: int, fixed: dict[str, dict | None], stack: ExitStack) -> dict[str, dict]:
    """The same trainings on `jobs` worker processes: the SFT student, then the teacher-free
    methods, train on one worker while this process trains the teachers; methods that need only
    the teacher's weights are queued once pi_dpo is on disk (while its service loads), every
    other one once the services are up. Rows come back in the config's order."""
    bar = stack.enter_context(tqdm(total=len(STAGE0) + planned_runs(run, seeds, fixed), desc="training", unit="model"))
    run.prepare()
    pool = stack.enter_context(_StudentPool(run, bar))
    student_threads(run.config)  # a worker trains beside the teachers from now on
    student_sft = pool.submit(_stage0_in_worker, "student SFT")
    futures: dict[str, Future] = {}
    lock = threading.Lock()
    late = threading.Event()

    def early() -> None:  # one at a time: the teachers train on the other core
        try:
            student_sft.result()
            for name in [n for n in fixed if run.config.methods[n].method in TEACHER_FREE]:
                with lock:
                    if late.is_set():
                        return
                    futures[name] = pool.submit(_train_in_worker, name, seeds, {}, fixed[name])
                futures[name].result()
        except BaseException:  # noqa: BLE001 - it resurfaces from its future in the main thread
            return

    chain = threading.Thread(target=early, name="adpa-demo-early", daemon=True)
    chain.start()
    services = train_teachers(run, stack, bar)
    run.curves["student SFT"] = student_sft.result()
    bar.update()

    def queue(names: list[str], endpoints: dict[str, str]) -> None:
        with lock:
            late.set()
            for name in names:
                if name not in futures:
                    futures[name] = pool.submit(_train_in_worker, name, seeds, endpoints, fixed[name])

    independent = [n for n in fixed if not sources(run.config, n)]
    queue([n for n in independent if run.config.methods[n].method in TEACHER_WEIGHTS_ONLY], {})
    endpoints = services_ready(services)
    queue(independent, endpoints)
    trained = {}
    for name in fixed:  # derived rows (ADPA+ from DCKD's students) are queued once their sources are done
        if name not in futures:
            for source in sources(run.config, name):
                trained[source], curves = futures[source].result()
                run.curves.update(curves)
            setting, starts = derived_inputs(run.config, name, fixed[name], trained)
            with lock:
                futures[name] = pool.submit(_train_in_worker, name, seeds, endpoints, setting, starts)
    for name in fixed:
        trained[name], curves = futures[name].result()
        run.curves.update(curves)
    return {name: trained[name] for name in fixed}


def planned_runs(run: DemoRun, seeds: int, fixed: dict[str, dict | None]) -> int:
    """Student trainings before any grid grows: every setting of each grid, then the other seeds."""
    methods = run.config.methods
    return sum((len(methods[n].candidates()) - 1 if s is None else 0) + seeds for n, s in fixed.items())


def student_threads(config: DemoConfig) -> None:
    """From the student SFT on, trainings share the machine (with the services, or each other):
    `torch_threads` from here on (one with workers, unless set), as the results' environment says."""
    threads = config.torch_threads or (1 if config.jobs > 1 else None)
    if threads:
        torch.set_num_threads(threads)


@dataclass
class Progress:
    """Where a method's runs report: the progress bar itself, or a queue to it from a worker."""

    start: Callable[[str], None]  # a run starts (its description)
    done: Callable[[], None]  # a run finished
    grow: Callable[[int], None]  # the search queued n more runs


def _grow(bar: tqdm, n: int) -> None:
    bar.total += n
    bar.refresh()


class _StudentPool:
    """`config.jobs` worker processes, each a `DemoRun` over the same workdir (world files and models
    on disk) with `config.torch_threads` (default one) torch threads, training one task at a time:
    a stage-0 model, or a method's whole search and seeds.

    A run's result does not depend on what trains beside it: its process trains it alone, and the
    demo's services forward one request at a time (batching off), so no answer depends on which
    requests would have shared a forward. The table is the one `jobs: 1` makes. Workers are spawned,
    not forked (the parent holds gRPC channels and torch's thread pool); their progress and log
    records come back over a queue to the parent's bar.
    """

    def __init__(self, run: DemoRun, bar: tqdm):
        self.run, self.bar = run, bar
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> _StudentPool:
        context = multiprocessing.get_context("spawn")
        self.events = context.Queue()
        run, jobs = self.run, self.run.config.jobs
        self.executor = ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker,
            initargs=(run.config, run.workdir, run.replicate, run.paths, self.events),
        )
        for _ in range(jobs):  # a process is spawned per task submitted while none is idle: all of them now
            self.executor.submit(int)
        self.relay = threading.Thread(target=self._relay, name="adpa-demo-progress", daemon=True)
        self.relay.start()
        return self

    def submit(self, fn: Callable, *args) -> Future:
        return self.executor.submit(fn, *args)

    def _relay(self) -> None:
        for kind, value in iter(self.events.get, None):
            if kind == "start":
                self.bar.set_postfix_str(value)
            elif kind == "done":
                self.bar.update()
            elif kind == "grow":
                _grow(self.bar, value)
            else:  # a worker's log record, through this process's handlers
                logging.getLogger(value.name).handle(value)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.executor.shutdown(wait=True)
        else:  # nothing a worker is doing now is wanted any more
            processes = list((getattr(self.executor, "_processes", None) or {}).values())
            self.executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
        self.events.put(None)
        self.relay.join()


class _LogRelay(logging.handlers.QueueHandler):
    """A worker's log records, sent to the parent as ("log", record) events."""

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


# This worker process's run, and the queue its progress and log records go to the parent over.
_WORKER: DemoRun | None = None
_EVENTS: multiprocessing.Queue | None = None


def _init_worker(config: DemoConfig, workdir: Path, replicate: int, paths: dict[str, Path], events) -> None:
    global _WORKER, _EVENTS
    # Imported here, not at the top: adpa.demo.pipeline imports this module.
    from adpa.demo.pipeline import DemoRun, configure_output

    configure_output()
    logging.getLogger().handlers[:] = [_LogRelay(events)]
    torch.set_num_threads(config.torch_threads or 1)
    _WORKER = DemoRun(config, workdir, replicate)
    _WORKER.load_world(paths)
    _EVENTS = events
    atexit.register(gc.freeze)  # exit without the last full collection, as the `adpa` program does (cli.run)


def _stage0_in_worker(label: str) -> list[tuple[int, float]]:
    return train_stage0(_WORKER, label)


def _train_in_worker(name: str, seeds: int, endpoints: dict[str, str], setting: dict | None,
                     starts: list[Path] | None = None) -> tuple[dict, dict]:
    """One method's row and its runs' loss curves."""
    run, events = _WORKER, _EVENTS
    progress = Progress(lambda text: events.put(("start", text)), lambda: events.put(("done", None)),
                        lambda n: events.put(("grow", n)))
    before = set(run.curves)
    record = run.train_method_all(name, seeds, endpoints, setting, progress, starts)
    return record, {label: curve for label, curve in run.curves.items() if label not in before}
