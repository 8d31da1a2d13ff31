"""The whole pipeline on the built-in world, through the real services:

    world data -> SFT teacher (pi_ref) -> DPO teacher (pi_dpo) -> SFT student
    -> `adpa serve` reference + teacher on loopback -> every student method, signals over gRPC
    -> ground-truth reward on held-out prompts -> results.json / results.md / results.png

Learning rates are chosen per method on the validation split (the same candidates budget for
each), with seed 0; the chosen setting is then trained with every seed and scored on the test
split, which nothing else ever reads. `DemoRun(config, workdir, replicate=r)` builds world
replicate r (world seed `world.seed + r`, stage-0 training seed r) and, given `settings`, trains
those instead of searching (adpa.demo.research runs several replicates and compares them).

This module is the run itself; its parts are `stage0` (the teachers, the SFT student, the
services), `schedule` (one process or `jobs` workers), `scoring` (validation and the test table)
and `provenance` (what the table depends on beyond the config).
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import datasets
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer

from adpa.demo.config import DemoConfig, Method, Stage
from adpa.demo.provenance import source_state
from adpa.demo.schedule import Progress, train_parallel, train_sequential
from adpa.demo.scoring import score_all, validation_score
from adpa.demo.search import search
from adpa.demo.stage0 import STAGE0, common_args, loss_curve, train_stage0, train_trl
from adpa.demo.world import WORDS, World, reward_texts
from adpa.tiny_model import make_tiny_model
from adpa.training.evaluate import EvalResult, evaluate

logger = logging.getLogger(__name__)

# The student methods that train on TRL's trainers (`adpa train`'s stage-0 methods); the others distil.
TRL_METHODS = ("dpo", "simpo", "seqkd")


class DemoRun:
    """One replicate of the demo: its world, its models on disk, and the trainings that make its table."""

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
        self.paths: dict[str, Path] = {}
        self.data: dict[str, datasets.Dataset] = {}
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self._seqkd_records: datasets.Dataset | None = None
        self._tokenized: dict[int, list] = {}  # max_length -> tokenised pairs
        self.evals: dict[str, list[EvalResult]] = {}  # test-split evaluations of the last run, per seed
        self.rows: dict[str, dict] = {}  # the last run's rows (name -> models and settings)

    # -- the world and stage 0 ------------------------------------------------------------------

    def write_world(self) -> None:
        """The world's data splits, from the config's world seed, as files and datasets."""
        self.load_world(World(self.world).write(self.workdir / "data"))

    def load_world(self, paths: dict[str, Path]) -> None:
        """The world's data splits, from their files."""
        self.paths = paths
        self.data = {name: datasets.load_dataset("json", data_files=str(p), split="train") for name, p in paths.items()}

    def reward(self, prompts: list, responses: list[str]) -> list[float]:
        """The ground-truth reward, with the config's weights."""
        return reward_texts(prompts, responses, self.config.world.reward)

    def build(self) -> None:
        """Stage 0: the world, pi_ref, pi_dpo and the SFT student."""
        self.prepare()
        for label in tqdm(STAGE0, desc="stage 0", unit="model"):
            train_stage0(self, label)

    def prepare(self) -> None:
        """The world's files and the two untrained models (what stage 0 starts from)."""
        c = self.config
        self.write_world()
        make_tiny_model(self.teacher_base, layers=c.teacher.layers, hidden=c.teacher.hidden, heads=c.teacher.heads,
                        seed=self.world.seed, init_std=0.02, words=WORDS)
        make_tiny_model(self.student_base, layers=c.student.layers, hidden=c.student.hidden, heads=c.student.heads,
                        seed=self.world.seed + 1, init_std=0.02, words=WORDS)

    # -- student methods --------------------------------------------------------------------------

    def train_method(self, name: str, method: Method, setting: dict, seed: int, endpoints: dict[str, str],
                     start: Path | None = None) -> Path:
        """Train one student with `method`, its fixed options and one `setting` of its grid, from `start`
        (another method's student, for `init_from`) or the SFT student."""
        c = self.config
        start = start or self.student_sft
        total_steps = method.steps or c.steps
        # Every Trainer.train starts with a full gc.collect (accelerate's free_memory), which walks
        # the whole heap (datasets, tokenised records, loaded libraries): ~0.2 s a run. Collect the
        # last run's garbage now and freeze what is left, so those collections only walk new objects.
        gc.collect()
        gc.freeze()
        out = self.models / "students" / _slug(name) / f"{_tag(setting)}-seed{seed}"
        options = {**method.options, **setting}
        lr = options.pop("learning_rate")
        pairs = self.data["pairs"]
        if method.method in TRL_METHODS:
            stage = Stage(steps=total_steps, lr=lr, batch_size=c.batch_size, options=options)
            # SeqKD is SFT on the teacher's generations: generated once, shared by every seed and setting.
            kind, data = ("sft", self._seqkd_data()) if method.method == "seqkd" else (method.method, pairs)
            trainer = train_trl(kind, start, data, self.paths["pairs"], out, stage, seed)
        else:
            from adpa.training.distill_config import DistillConfig
            from adpa.training.run import RunArguments, train

            plus = method.method == "adpa-plus"
            steps = total_steps // 2 if plus else total_steps
            config = DistillConfig(
                **common_args(out, steps, lr, c.batch_size, seed),
                method="adpa" if plus else method.method, teacher=endpoints[method.teacher],
                max_new_tokens=c.max_new_tokens,
                # Offline samples (and top-k answers) depend on the student, the seed and the support,
                # not on the learning rate or gamma: a grid's settings draw them once.
                cache_dir=str(self.workdir / "cache") if options.get("rollout", "offline") == "offline" else None,
                **options,
            )
            # adpa-plus: as many steps in all as ADPA alone, half DCKD, half ADPA.
            run = RunArguments(model=str(start), dataset=str(self.paths["pairs"]),
                               plus_dckd_steps=total_steps - steps if plus else None)
            trainer = train(method.method, run, config, pairs, silent=True,
                            examples=self._examples(pairs, config.max_length))
        self.curves[_run_label(name, setting, seed)] = loss_curve(trainer)
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
            train = train_parallel if self.config.jobs > 1 else train_sequential
            trained = train(self, seeds, fixed, stack)
        results = score_all(self, trained, seeds)
        results["environment"].update(source)  # the code the run started from
        results["seconds"] = round(time.perf_counter() - started, 1)
        return results

    def train_method_all(self, name: str, seeds: int, endpoints: dict[str, str], setting: dict | None,
                         progress: Progress, starts: list[Path] | None = None) -> dict:
        """One method's row: its grid searched on validation with seed 0 (unless `setting` is given),
        then the chosen setting trained with every seed; seed s starts from `starts[s]` when given (the
        `init_from` method's student of that seed), else from the SFT student."""
        method = self.config.methods[name]
        start = (lambda seed: Path(starts[seed])) if starts else (lambda seed: None)
        extra = {"init_models": [str(p) for p in starts[:seeds]]} if starts else {}
        if setting is not None:  # chosen elsewhere (a tuning world, or another method): train every seed
            runs = []
            for seed in range(seeds):
                progress.start(f"{name} seed={seed}")
                runs.append(self.train_method(name, method, setting, seed, endpoints, start(seed)))
                progress.done()
            return {"setting": setting, "models": runs, "curve": self.curves[_run_label(name, setting, 0)], **extra}
        models: dict[str, Path] = {}

        def score(setting: dict) -> float:
            progress.start(f"{name} {setting}")
            models[_tag(setting)] = model = self.train_method(name, method, setting, 0, endpoints, start(0))
            progress.done()
            return validation_score(self, model)

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
            runs.append(self.train_method(name, method, best, seed, endpoints, start(seed)))
            progress.done()
        logger.info("%s: %s chosen on validation (%s)%s", name, best,
                    "; ".join(f"{t[0]}: {t[1]:.3f}" for t in found.tried),
                    f"; grid extended {found.extensions}" if found.extensions else "")
        return {"setting": best, "validation": [{**t[0], "reward": t[1]} for t in found.tried],
                "search": found.record(), "models": runs, "curve": self.curves[_run_label(name, best, 0)], **extra}


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

