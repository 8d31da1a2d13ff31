"""The whole pipeline on the built-in world, through the real services:

    world data -> SFT teacher (pi_ref) -> DPO teacher (pi_dpo) -> SFT student
    -> `adpa serve` reference + teacher on loopback -> every student method, signals over gRPC
    -> ground-truth reward on held-out prompts -> results.json / results.md / results.png

Learning rates are chosen per method on the validation split (the same candidates budget for
each), with seed 0; the chosen setting is then trained with every seed and scored on the test
split, which nothing else ever reads. `DemoRun(config, workdir, replicate=r)` builds world
replicate r (world seed `world.seed + r`, stage-0 training seed r) and, given `settings`, trains
those instead of searching (adpa.demo.research runs several replicates and compares them).
"""

from __future__ import annotations

import gc
import json
import logging
import logging.handlers
import multiprocessing
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer

from adpa.demo.config import DemoConfig, Method, Stage
from adpa.demo.search import search
from adpa.demo.world import WORDS, World, reward_texts
from adpa.services.launch import ServiceProcess
from adpa.tiny_model import make_tiny_model
from adpa.training.evaluate import EvalResult, evaluate, win_rate

logger = logging.getLogger(__name__)

# The services run with one torch thread each, beside the pipeline's own training.
SERVICE_ENV = {"ADPA_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
# One request forwarded at a time: with several student workers, a batched forward would make an
# answer depend on which requests happened to share it (padding changes the last bits).
SERVICE_ARGS = ["--no-batching"]


def _common_args(out: Path, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    return dict(
        output_dir=str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], use_cpu=True, seed=seed,
        disable_tqdm=True, lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, steps // 10),
        # TRL turns it on by default; on these tiny models it only costs a second forward per step.
        gradient_checkpointing=False,
        # TRL's configs also default to bf16 autocast. A CPU without bf16 units emulates it: the
        # teacher SFT ran 4x slower (100 steps: 18.0 s vs 4.2 s), and stage 0 and the TRL baselines
        # (DPO, SimPO, SeqKD) trained at another precision than the distilled students. All fp32.
        bf16=False,
    )


def _stage0(kind: str, model: str, records: datasets.Dataset, out: Path, stage: Stage, seed: int = 0):
    from adpa.training import stage0

    args = {**_common_args(out, stage.steps, stage.lr, stage.batch_size, seed), **stage.options}
    if kind == "sft":
        return stage0.train_sft(model, records, stage0.SFTConfig(**args), silent=True)
    if kind == "dpo":
        return stage0.train_dpo(model, records, stage0.DPOConfig(**args), silent=True)
    if kind == "simpo":
        # remove_unused_columns: CPOTrainer turns it off itself, with a warning on every run.
        config = stage0.CPOConfig(**{"loss_type": "simpo", "cpo_alpha": 0.0, "remove_unused_columns": False, **args})
        return stage0.train_simpo(model, records, config, silent=True)
    raise ValueError(kind)


# Stage 0, in order: label -> (kind, model it starts from, split, model it makes, its config field).
# The SFT student needs neither teacher, so with jobs > 1 it trains in a worker beside them.
STAGE0 = {
    "teacher SFT (pi_ref)": ("sft", "teacher_base", "sft", "reference", "teacher_sft"),
    "teacher DPO (pi_dpo)": ("dpo", "reference", "pairs", "teacher", "teacher_dpo"),
    "student SFT": ("sft", "student_base", "sft", "student_sft", "student_sft"),
}
# Student methods that read neither a teacher model nor the services (with jobs > 1 they can train
# while the teachers do), and those that read the teacher's weights but not the services.
TEACHER_FREE = ("dpo", "simpo")
TEACHER_WEIGHTS_ONLY = ("seqkd",)


class DemoRun:
    def __init__(self, config: DemoConfig, workdir: str | Path, replicate: int = 0):
        self.config = config
        self.replicate = replicate
        # Replicate r: its own world (seed + r), model inits (which follow the world seed) and stage-0 seed.
        self.world = config.world.model_copy(update={"seed": config.world.seed + replicate})
        self.workdir = Path(workdir)
        self.models = self.workdir / "models"
        self.teacher_base = self.models / "teacher-base"
        self.student_base = self.models / "student-base"
        self.reference = self.models / "reference"  # pi_ref: the teacher's SFT
        self.teacher = self.models / "teacher"  # pi_dpo
        self.student_sft = self.models / "student-sft"
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self._seqkd_records: datasets.Dataset | None = None
        self._tokenized: dict[int, list] = {}  # max_length -> tokenised pairs
        self.evals: dict[str, list[EvalResult]] = {}  # test-split evaluations of the last run, per seed
        self.rows: dict[str, dict] = {}  # the last run's rows (name -> models and settings)

    # -- the world and stage 0 ------------------------------------------------------------------

    def write_world(self) -> None:
        """The world's data splits, from the config's world seed, as files and datasets."""
        self._load_world(World(self.world).write(self.workdir / "data"))

    def _load_world(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.data = {name: datasets.load_dataset("json", data_files=str(p), split="train") for name, p in paths.items()}

    def reward(self, prompts: list, responses: list[str]) -> list[float]:
        """The ground-truth reward, with the config's weights."""
        return reward_texts(prompts, responses, self.config.world.reward)

    def build(self) -> None:
        """Stage 0: the world, pi_ref, pi_dpo and the SFT student."""
        self.prepare()
        for label in tqdm(STAGE0, desc="stage 0", unit="model"):
            self.train_stage0(label)

    def prepare(self) -> None:
        """The world's files and the two untrained models (what stage 0 starts from)."""
        c = self.config
        self.write_world()
        make_tiny_model(self.teacher_base, layers=c.teacher.layers, hidden=c.teacher.hidden, heads=c.teacher.heads,
                        seed=self.world.seed, init_std=0.02, words=WORDS)
        make_tiny_model(self.student_base, layers=c.student.layers, hidden=c.student.hidden, heads=c.student.heads,
                        seed=self.world.seed + 1, init_std=0.02, words=WORDS)

    def train_stage0(self, label: str) -> list[tuple[int, float]]:
        """One stage-0 model (a key of STAGE0); returns its loss curve (also kept in `curves`)."""
        kind, start, split, out, stage = STAGE0[label]
        started = time.perf_counter()
        trainer = _stage0(kind, str(getattr(self, start)), self.data[split], getattr(self, out),
                          getattr(self.config, stage), seed=self.replicate)
        self.curves[label] = _curve(trainer)
        logger.info("%s: %d steps in %.0fs", label, getattr(self.config, stage).steps, time.perf_counter() - started)
        return self.curves[label]

    # -- student methods --------------------------------------------------------------------------

    def train_method(self, name: str, method: Method, setting: dict, seed: int, endpoints: dict[str, str]) -> Path:
        """Train one student with `method`, its fixed options and one `setting` of its grid."""
        c = self.config
        # Every Trainer.train starts with a full gc.collect (accelerate's free_memory), which walks
        # the whole heap (datasets, tokenised records, loaded libraries): ~0.2 s a run. Collect the
        # last run's garbage now and freeze what is left, so those collections only walk new objects.
        gc.collect()
        gc.freeze()
        out = self.models / "students" / _slug(name) / f"{_tag(setting)}-seed{seed}"
        options = {**method.options, **setting}
        lr = options.pop("learning_rate")
        pairs = self.data["pairs"]
        if method.method in ("dpo", "simpo", "seqkd"):
            stage = Stage(steps=c.steps, lr=lr, batch_size=c.batch_size, options=options)
            data = self._seqkd_data() if method.method == "seqkd" else pairs
            trainer = _stage0("sft" if method.method == "seqkd" else method.method, str(self.student_sft), data, out,
                              stage, seed)
        else:
            from adpa.training.run import RunArguments, run_adpa_plus, run_distill
            from adpa.training.distill_config import DistillConfig

            plus = method.method == "adpa-plus"
            steps = c.steps // 2 if plus else c.steps
            config = DistillConfig(
                **_common_args(out, steps, lr, c.batch_size, seed),
                method="adpa" if plus else method.method, teacher=endpoints[method.teacher],
                max_new_tokens=c.max_new_tokens,
                # Offline samples (and top-k answers) depend on the student, the seed and the support,
                # not on the learning rate or gamma: a grid's settings draw them once.
                cache_dir=str(self.workdir / "cache") if options.get("rollout", "offline") == "offline" else None,
                **options,
            )
            examples = self._examples(pairs, config.max_length)
            if plus:  # as many steps in all as ADPA alone: half DCKD, half ADPA
                run = RunArguments(model=str(self.student_sft), dataset=str(self.paths["pairs"]),
                                   plus_dckd_steps=c.steps - steps)
                trainer = run_adpa_plus(run, config, pairs, silent=True, examples=examples)
            else:
                trainer = run_distill(str(self.student_sft), config, pairs, silent=True, examples=examples)
        self.curves[_run_label(name, setting, seed)] = _curve(trainer)
        return out


    def _examples(self, records: datasets.Dataset, max_length: int) -> list:
        """The preference records tokenised once (every student shares the world's tokenizer)."""
        if max_length not in self._tokenized:
            from adpa.training.data import tokenize_preferences

            tokenizer = AutoTokenizer.from_pretrained(self.student_sft)
            self._tokenized[max_length] = tokenize_preferences(records, tokenizer, max_length=max_length)
        return self._tokenized[max_length]

    def _seqkd_data(self) -> datasets.Dataset:
        if self._seqkd_records is None:
            from adpa.training.stage0 import teacher_generations

            tokenizer = AutoTokenizer.from_pretrained(self.teacher)
            self._seqkd_records = teacher_generations(str(self.teacher), self.data["pairs"], tokenizer,
                                                      max_new_tokens=self.config.max_new_tokens)
        return self._seqkd_records

    def evaluate(self, model: Path, split: str, modes=("greedy", "sampled"), seed: int = 0) -> EvalResult:
        return evaluate(str(model), self.data[split]["prompt"], self.reward,
                        max_new_tokens=self.config.max_new_tokens, seed=seed, modes=modes)

    # -- the whole run ----------------------------------------------------------------------------

    def run(self, seeds: int | None = None, settings: dict[str, dict] | None = None) -> dict:
        """Build stage 0, train every method (searching its grid, or with `settings[name]` when given) with
        `seeds` seeds, and score everything on the test split."""
        seeds = seeds or self.config.seeds
        started = time.perf_counter()
        source = source_state()
        methods = self.config.methods
        if settings is not None and set(settings) != set(methods):
            raise ValueError(f"settings for {sorted(settings)}, methods {sorted(methods)}")
        fixed = {name: settings[name] if settings is not None else None for name in methods}
        with logging_redirect_tqdm(), ExitStack() as stack:
            train = self._train_parallel if self.config.jobs > 1 else self._train_sequential
            trained = train(seeds, fixed, stack)
        results = self._score_all(trained, seeds)
        results["environment"].update(source)  # the code the run started from
        results["seconds"] = round(time.perf_counter() - started, 1)
        return results

    def _train_sequential(self, seeds: int, fixed: dict[str, dict | None], stack: ExitStack) -> dict[str, dict]:
        """Stage 0, then every method, one training at a time in this process."""
        self.prepare()
        with tqdm(total=len(STAGE0), desc="stage 0", unit="model") as bar:
            services = self._train_teachers(stack, bar)
            self._student_threads()
            bar.set_postfix_str("student SFT")
            self.train_stage0("student SFT")  # while the services load
            bar.update()
        endpoints = self._services_ready(services)
        with tqdm(total=self._runs(seeds, fixed), desc="student methods", unit="run") as bar:
            progress = _Progress(bar.set_postfix_str, bar.update, lambda n: _grow(bar, n))
            return {name: self.train_method_all(name, seeds, endpoints, fixed[name], progress) for name in fixed}

    def _train_parallel(self, seeds: int, fixed: dict[str, dict | None], stack: ExitStack) -> dict[str, dict]:
        """The same trainings on `jobs` worker processes: the SFT student, then the teacher-free
        methods, train on one worker while this process trains the teachers; methods that need only
        the teacher's weights are queued once pi_dpo is on disk (while its service loads), every
        other one once the services are up. Rows come back in the config's order."""
        bar = stack.enter_context(tqdm(total=len(STAGE0) + self._runs(seeds, fixed), desc="training", unit="model"))
        self.prepare()
        pool = stack.enter_context(_StudentPool(self, bar))
        self._student_threads()  # a worker trains beside the teachers from now on
        student_sft = pool.submit(_stage0_in_worker, "student SFT")
        futures: dict[str, Future] = {}
        lock = threading.Lock()
        late = threading.Event()

        def early() -> None:  # one at a time: the teachers train on the other core
            try:
                student_sft.result()
                for name in [n for n in fixed if self.config.methods[n].method in TEACHER_FREE]:
                    with lock:
                        if late.is_set():
                            return
                        futures[name] = pool.submit(_train_in_worker, name, seeds, {}, fixed[name])
                    futures[name].result()
            except BaseException:  # noqa: BLE001 - it resurfaces from its future in the main thread
                return

        chain = threading.Thread(target=early, name="adpa-demo-early", daemon=True)
        chain.start()
        services = self._train_teachers(stack, bar)
        self.curves["student SFT"] = student_sft.result()
        bar.update()

        def queue(names: list[str], endpoints: dict[str, str]) -> None:
            with lock:
                late.set()
                for name in names:
                    if name not in futures:
                        futures[name] = pool.submit(_train_in_worker, name, seeds, endpoints, fixed[name])

        queue([n for n in fixed if self.config.methods[n].method in TEACHER_WEIGHTS_ONLY], {})
        queue(list(fixed), self._services_ready(services))
        trained = {}
        for name in fixed:
            trained[name], curves = futures[name].result()
            self.curves.update(curves)
        return trained

    def _runs(self, seeds: int, fixed: dict[str, dict | None]) -> int:
        """Student trainings before any grid grows: every setting of each grid, then the other seeds."""
        methods = self.config.methods
        return sum((len(methods[n].candidates()) - 1 if s is None else 0) + seeds for n, s in fixed.items())

    def _student_threads(self) -> None:
        """From the student SFT on, trainings share the machine (with the services, or each other):
        `torch_threads` from here on (one with workers, unless set), as the results' environment says."""
        threads = self.config.torch_threads or (1 if self.config.jobs > 1 else None)
        if threads:
            torch.set_num_threads(threads)

    def _train_teachers(self, stack: ExitStack, bar: tqdm | None = None) -> list[ServiceProcess]:
        """pi_ref, then pi_dpo, in this process; each one's service starts loading as soon as its model
        is on disk (stopped when `stack` closes). Returns the reference and teacher services."""
        log = self.workdir / "logs"
        log.mkdir(parents=True, exist_ok=True)
        services = []
        for label, role in zip(STAGE0, ("reference", "teacher")):
            if bar is not None:
                bar.set_postfix_str(label)
            self.train_stage0(label)
            if bar is not None:
                bar.update()
            args = ["--role", role, "--model", str(getattr(self, role)), *SERVICE_ARGS]
            if role == "teacher":  # it waits for its reference to answer
                args += ["--reference", services[0].endpoint, "--beta", str(self.config.beta)]
            service = ServiceProcess(args, env=SERVICE_ENV, log_path=log / f"{role}.log")
            stack.callback(service.stop)
            services.append(service.launch())
        return services

    def _services_ready(self, services: list[ServiceProcess]) -> dict[str, str]:
        reference, teacher = (service.wait_ready() for service in services)
        logger.info("services up: reference %s, teacher %s", reference.endpoint, teacher.endpoint)
        return {"teacher": teacher.endpoint, "reference": reference.endpoint}

    def _validation_score(self, model: Path) -> float:
        modes = ("greedy",) if self.config.search.select_on == "greedy" else ("greedy", "sampled")
        result = self.evaluate(model, "validation", modes=modes)
        return statistics.fmean(result.modes[m].mean_reward for m in modes)

    def train_method_all(self, name: str, seeds: int, endpoints: dict[str, str], setting: dict | None,
                         progress: _Progress) -> dict:
        """One method's row: its grid searched on validation with seed 0 (unless `setting` is given),
        then the chosen setting trained with every seed."""
        method = self.config.methods[name]
        if setting is not None:  # chosen elsewhere (world 0's validation split): train every seed
            runs = []
            for seed in range(seeds):
                progress.start(f"{name} seed={seed}")
                runs.append(self.train_method(name, method, setting, seed, endpoints))
                progress.done()
            return {"setting": setting, "models": runs, "curve": self.curves[_run_label(name, setting, 0)]}
        models: dict[str, Path] = {}

        def score(setting: dict) -> float:
            progress.start(f"{name} {setting}")
            models[_tag(setting)] = model = self.train_method(name, method, setting, 0, endpoints)
            progress.done()
            return self._validation_score(model)

        batches = []

        def grow(n: int) -> None:  # the grid itself is counted in the bar's total already
            if batches:
                progress.grow(n)
            batches.append(n)

        found = search(method.grid, score, self.config.search.max_extensions, on_new=grow)
        best = found.best
        runs = [models[_tag(best)]]
        for seed in range(1, seeds):
            progress.start(f"{name} seed={seed}")
            runs.append(self.train_method(name, method, best, seed, endpoints))
            progress.done()
        logger.info("%s: %s chosen on validation (%s)%s", name, best,
                    "; ".join(f"{t[0]}: {t[1]:.3f}" for t in found.tried),
                    f"; grid extended {found.extensions}" if found.extensions else "")
        return {"setting": best, "validation": [{**t[0], "reward": t[1]} for t in found.tried],
                "search": found.record(), "models": runs, "curve": self.curves[_run_label(name, best, 0)]}

    def _score_all(self, trained: dict[str, dict], seeds: int) -> dict:
        rows = {
            "Teacher (DPO)": {"models": [self.teacher]},
            "Teacher SFT (reference)": {"models": [self.reference]},
            "Student (untrained)": {"models": [self.student_base]},
            "SFT": {"models": [self.student_sft]},
            **trained,
        }
        evals: dict[str, list[EvalResult]] = {}
        for name, row in tqdm(rows.items(), desc="evaluating on test", unit="method"):
            evals[name] = [self.evaluate(m, "test", seed=i) for i, m in enumerate(row["models"])]
        self.evals, self.rows = evals, rows
        table = {}
        for name, row in rows.items():
            entry = {k: v for k, v in row.items() if k != "models"}
            entry["models"] = [str(m) for m in row["models"]]
            for mode in ("greedy", "sampled"):
                means = [e.modes[mode].mean_reward for e in evals[name]]
                entry[f"reward_{mode}"] = _mean_std(means)
                for baseline in ("ADPA", "SFT"):
                    if baseline in evals:
                        rates = [win_rate(e.modes[mode].rewards, evals[baseline][i % len(evals[baseline])].modes[mode].rewards)
                                 for i, e in enumerate(evals[name])]
                        entry[f"win_rate_vs_{baseline}_{mode}"] = _mean_std(rates)
            entry["examples"] = [
                {"prompt": p[-1]["content"], "greedy": r}
                for p, r in list(zip(self.data["test"]["prompt"], evals[name][0].modes["greedy"].responses))[:3]
            ]
            table[name] = entry
        return {"config": self.config.model_dump(), "seeds": seeds, "methods": table, "curves": self.curves,
                "environment": environment()}


def configure_output() -> None:
    """The demo's console: INFO logs of its own, warnings only from the libraries, no library progress
    bars (the pipeline shows its own); the same in the pipeline's process and in its workers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "trl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TRL still calls transformers' renamed gradient-checkpointing methods: noise between the bars.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class _Progress:
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


_WORKER: DemoRun | None = None


def _init_worker(config: DemoConfig, workdir: Path, replicate: int, paths: dict[str, Path], events) -> None:
    global _WORKER
    configure_output()
    logging.getLogger().handlers[:] = [_LogRelay(events)]
    torch.set_num_threads(config.torch_threads or 1)
    _WORKER = DemoRun(config, workdir, replicate)
    _WORKER._load_world(paths)
    _WORKER._events = events


def _stage0_in_worker(label: str) -> list[tuple[int, float]]:
    return _WORKER.train_stage0(label)


def _train_in_worker(name: str, seeds: int, endpoints: dict[str, str], setting: dict | None) -> tuple[dict, dict]:
    """One method's row and its runs' loss curves."""
    run, events = _WORKER, _WORKER._events
    progress = _Progress(lambda text: events.put(("start", text)), lambda: events.put(("done", None)),
                         lambda n: events.put(("grow", n)))
    before = set(run.curves)
    record = run.train_method_all(name, seeds, endpoints, setting, progress)
    return record, {label: curve for label, curve in run.curves.items() if label not in before}


def environment() -> dict:
    """What a table depends on beyond the config: package versions, torch's threads and CPU, the commit.

    Runs are deterministic on one machine; another CPU (or thread count, or library version) changes
    floating-point round-off, and with it the trained weights: compare across machines within the
    reported intervals.
    """
    import importlib.metadata
    import os
    import platform
    import subprocess

    import torch

    versions = {}
    for package in ("adpa", "torch", "transformers", "trl", "datasets", "tokenizers", "accelerate", "numpy",
                    "grpcio", "pydantic"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu: dict = {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count()}
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and "model" not in cpu:
                cpu["model"] = value.strip()
            if key.strip() == "flags":
                cpu["flags"] = value.split()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "service_env": SERVICE_ENV,
        "cpu": cpu,
        **source_state(),
    }


def source_state() -> dict:
    """The commit of the checkout and whether its code (not docs) differed from it: call it when a run
    starts, since a shared working tree can change under a long run."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "*.py", "*.yaml", "*.proto")
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_code_changes": None if changed is None else len(changed.splitlines())}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _curve(trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def _tag(setting: dict) -> str:
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in setting.items())


def _run_label(name: str, setting: dict, seed: int) -> str:
    return f"{name} ({_tag(setting)}, seed {seed})"


def _slug(name: str) -> str:
    """A folder name for a method ("ADPA+" and "ADPA" must not collide)."""
    name = name.lower().replace("+", " plus")
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name).split())


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md and results.png in `out`."""
    from adpa.demo.report import markdown_table, plot

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(results))
    plot(results, out / "results.png")

