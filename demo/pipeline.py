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

import json
import logging
import statistics
import time
from pathlib import Path

import datasets
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from adpa.demo.config import DemoConfig, Method, Stage
from adpa.demo.search import search
from adpa.demo.world import WORDS, World, reward_texts
from adpa.services.launch import ServiceProcess
from adpa.tiny_model import make_tiny_model
from adpa.training.evaluate import EvalResult, evaluate, win_rate

logger = logging.getLogger(__name__)

# Stage-0 and baselines train with one thread; the services get the other core.
SERVICE_ENV = {"ADPA_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _common_args(out: Path, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    return dict(
        output_dir=str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], use_cpu=True, seed=seed,
        disable_tqdm=True, lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, steps // 10),
        # TRL turns it on by default; on these tiny models it only costs a second forward per step.
        gradient_checkpointing=False,
    )


def _stage0(kind: str, model: str, records: datasets.Dataset, out: Path, stage: Stage, seed: int = 0):
    from adpa.training import stage0

    args = {**_common_args(out, stage.steps, stage.lr, stage.batch_size, seed), **stage.options}
    if kind == "sft":
        return stage0.train_sft(model, records, stage0.SFTConfig(**args), silent=True)
    if kind == "dpo":
        return stage0.train_dpo(model, records, stage0.DPOConfig(**args), silent=True)
    if kind == "simpo":
        return stage0.train_simpo(
            model, records, stage0.CPOConfig(**{"loss_type": "simpo", "cpo_alpha": 0.0, **args}), silent=True
        )
    raise ValueError(kind)


class DemoRun:
    def __init__(self, config: DemoConfig, workdir: str | Path, replicate: int = 0):
        self.config = config
        self.replicate = replicate
        # Replicate r: its own world (seed + r), model inits (which follow the world seed) and stage-0 seed.
        self.world = config.world.model_copy(update={"seed": config.world.seed + replicate})
        self.workdir = Path(workdir)
        self.models = self.workdir / "models"
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self._seqkd_records: datasets.Dataset | None = None
        self._tokenized: dict[int, list] = {}  # max_length -> tokenised pairs
        self.evals: dict[str, list[EvalResult]] = {}  # test-split evaluations of the last run, per seed
        self.rows: dict[str, dict] = {}  # the last run's rows (name -> models and settings)

    # -- the world and stage 0 ------------------------------------------------------------------

    def write_world(self) -> None:
        """The world's data splits, from the config's world seed, as files and datasets."""
        self.paths = World(self.world).write(self.workdir / "data")
        self.data = {name: datasets.load_dataset("json", data_files=str(p), split="train")
                     for name, p in self.paths.items()}

    def reward(self, prompts: list, responses: list[str]) -> list[float]:
        """The ground-truth reward, with the config's weights."""
        return reward_texts(prompts, responses, self.config.world.reward)

    def build(self) -> None:
        c = self.config
        self.write_world()
        teacher_base = make_tiny_model(self.models / "teacher-base", layers=c.teacher.layers, hidden=c.teacher.hidden,
                                       heads=c.teacher.heads, seed=self.world.seed, init_std=0.02, words=WORDS)
        self.student_base = make_tiny_model(self.models / "student-base", layers=c.student.layers,
                                            hidden=c.student.hidden, heads=c.student.heads, seed=self.world.seed + 1,
                                            init_std=0.02, words=WORDS)
        self.reference = self.models / "reference"
        self.teacher = self.models / "teacher"
        self.student_sft = self.models / "student-sft"
        steps = [
            ("teacher SFT (pi_ref)", "sft", teacher_base, "sft", self.reference, c.teacher_sft),
            ("teacher DPO (pi_dpo)", "dpo", self.reference, "pairs", self.teacher, c.teacher_dpo),
            ("student SFT", "sft", self.student_base, "sft", self.student_sft, c.student_sft),
        ]
        for label, kind, model, split, out, stage in tqdm(steps, desc="stage 0", unit="model"):
            started = time.perf_counter()
            trainer = _stage0(kind, str(model), self.data[split], out, stage, seed=self.replicate)
            self.curves[label] = _curve(trainer)
            logger.info("%s: %d steps in %.0fs", label, stage.steps, time.perf_counter() - started)

    # -- student methods --------------------------------------------------------------------------

    def train_method(self, name: str, method: Method, setting: dict, seed: int, endpoints: dict[str, str]) -> Path:
        """Train one student with `method`, its fixed options and one `setting` of its grid."""
        c = self.config
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
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self.build()
        log = self.workdir / "logs"
        log.mkdir(parents=True, exist_ok=True)
        ref_args = ["--role", "reference", "--model", str(self.reference)]
        with ServiceProcess(ref_args, env=SERVICE_ENV, log_path=log / "reference.log") as reference:
            teacher_args = ["--role", "teacher", "--model", str(self.teacher), "--reference", reference.endpoint,
                            "--beta", str(self.config.beta)]
            with ServiceProcess(teacher_args, env=SERVICE_ENV, log_path=log / "teacher.log") as teacher:
                logger.info("services up: reference %s, teacher %s", reference.endpoint, teacher.endpoint)
                endpoints = {"teacher": teacher.endpoint, "reference": reference.endpoint}
                trained = self._train_all(seeds, endpoints, settings)
        results = self._score_all(trained, seeds)
        results["environment"].update(source)  # the code the run started from
        results["seconds"] = round(time.perf_counter() - started, 1)
        return results

    def _validation_score(self, model: Path) -> float:
        modes = ("greedy",) if self.config.search.select_on == "greedy" else ("greedy", "sampled")
        result = self.evaluate(model, "validation", modes=modes)
        return statistics.fmean(result.modes[m].mean_reward for m in modes)

    def _train_all(self, seeds: int, endpoints: dict[str, str],
                   settings: dict[str, dict] | None = None) -> dict[str, dict]:
        trained: dict[str, dict] = {}
        methods = self.config.methods
        if settings is not None and set(settings) != set(methods):
            raise ValueError(f"settings for {sorted(settings)}, methods {sorted(methods)}")
        jobs = sum((len(m.candidates()) - 1 if settings is None else 0) + seeds for m in methods.values())
        with tqdm(total=jobs, desc="student methods", unit="run") as bar:
            for name, method in methods.items():
                if settings is not None:  # chosen elsewhere (world 0's validation split): train every seed
                    best, runs = settings[name], []
                    for seed in range(seeds):
                        bar.set_postfix_str(f"{name} seed={seed}")
                        runs.append(self.train_method(name, method, best, seed, endpoints))
                        bar.update()
                    trained[name] = {"setting": best, "models": runs,
                                     "curve": self.curves[_run_label(name, best, 0)]}
                    continue
                models: dict[str, Path] = {}

                def score(setting: dict, name=name, method=method, models=models) -> float:
                    bar.set_postfix_str(f"{name} {setting}")
                    models[_tag(setting)] = model = self.train_method(name, method, setting, 0, endpoints)
                    bar.update()
                    return self._validation_score(model)

                batches = []

                def grow(n: int, batches=batches) -> None:  # the grid itself is counted in `jobs` already
                    if batches:
                        bar.total += n
                        bar.refresh()
                    batches.append(n)

                found = search(method.grid, score, self.config.search.max_extensions, on_new=grow)
                best = found.best
                runs = [models[_tag(best)]]
                for seed in range(1, seeds):
                    bar.set_postfix_str(f"{name} seed={seed}")
                    runs.append(self.train_method(name, method, best, seed, endpoints))
                    bar.update()
                trained[name] = {"setting": best, "validation": [{**t[0], "reward": t[1]} for t in found.tried],
                                 "search": found.record(), "models": runs,
                                 "curve": self.curves[_run_label(name, best, 0)]}
                logger.info("%s: %s chosen on validation (%s)%s", name, best,
                            "; ".join(f"{t[0]}: {t[1]:.3f}" for t in found.tried),
                            f"; grid extended {found.extensions}" if found.extensions else "")
        return trained

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

