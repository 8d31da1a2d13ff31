"""The built-in world, and a shrunken demo end to end: two world replicates x two seeds through the
services, two methods (one grid extended), evaluation, the paired intervals and the reports. The
end-to-end run happens once per suite (the `small_demo` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adpa.bench.demo_time import ROW_FIELDS
from adpa.demo.config import DEFAULT_CONFIG, DemoConfig
from adpa.demo.pipeline import DemoRun
from adpa.demo.research import run_research, write_research
from adpa.demo.world import Prompt, RewardWeights, World, WorldConfig, reward

from .conftest import children_unmeasured

SMALL = {
    "world": {"num_sft": 400, "num_pairs": 200, "num_validation": 20, "num_test": 40},
    "teacher_sft": {"steps": 100, "lr": 3.0e-3, "batch_size": 32},
    "teacher_dpo": {"steps": 30, "lr": 1.0e-4, "batch_size": 32, "options": {"beta": 0.1}},
    "student_sft": {"steps": 40, "lr": 1.0e-2, "batch_size": 32},
    "steps": 12,
    "batch_size": 8,
    "methods": {
        "DCKD": {"method": "dckd", "grid": {"learning_rate": [1.0e-3]}},
        "ADPA": {"method": "adpa", "grid": {"learning_rate": [1.0e-3], "gamma": [1.0, 10.0]},
                 "options": {"support": "indices", "student_k": 4, "support_k": 4, "support_floor": 1.0e-3}},
    },
}
# The research machinery, shrunken: one tuning world, then 2 test worlds x 1 seed; ADPA+ starts from
# DCKD's students; two pre-registered claims decided over the test worlds.
_ADPA_OPTIONS = {"support": "indices", "student_k": 4, "support_k": 4, "support_floor": 1.0e-3}
SMALL_RESEARCH = {**SMALL, "name": "small", "tuning_worlds": 1, "worlds": 2, "seeds": 1, "torch_threads": 1,
                  "search": {"max_extensions": 0, "select_on": "sampled"},
                  "primary": [{"key": "T1.6", "better": "ADPA", "worse": "DCKD", "decoding": "sampled"},
                              {"key": "T1.7", "better": "ADPA+", "worse": "ADPA", "decoding": "sampled"}],
                  "methods": {**SMALL["methods"],
                              "ADPA+": {"method": "adpa", "init_from": "DCKD", "grid": {"learning_rate": [1.0e-3]},
                                        "options": _ADPA_OPTIONS}}}


def test_reward_prefers_right_polite_clean_and_short_answers():
    w = RewardWeights()
    polite = Prompt("reverse", ("fox", "red", "owl"), polite=True)
    plain = Prompt("sort", ("fox", "red", "owl"), polite=False)
    assert reward(polite, "owl red fox thanks", w) == pytest.approx(1.5)
    assert reward(plain, "red fox owl", w) == pytest.approx(1.5)  # ITEMS order: red < fox < owl
    assert reward(plain, "red fox owl thanks", w) < reward(plain, "red fox owl", w)  # unwanted closing
    assert reward(polite, "owl red fox", w) < reward(polite, "owl red fox thanks", w)  # wanted closing missing
    assert reward(polite, "owl red fox stupid thanks", w) == pytest.approx(1.5 - 1.0 - 0.1)
    assert reward(polite, "red owl fox thanks", w) == pytest.approx(1 / 3 + 0.5)  # one position right
    assert reward(Prompt("first", ("cat", "dog", "ant"), False), "cat", w) == pytest.approx(1.5)


def test_world_is_seeded_and_keeps_test_prompts_out_of_training(tmp_path):
    config = WorldConfig(num_sft=200, num_pairs=100, num_validation=20, num_test=30)
    a = World(config).write(tmp_path / "a")
    b = World(config).write(tmp_path / "b")
    c = World(config.model_copy(update={"seed": 1})).write(tmp_path / "c")
    assert a["pairs"].read_text() == b["pairs"].read_text()
    assert a["pairs"].read_text() != c["pairs"].read_text()
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in a.items()}
    held_out = {r["prompt"][0]["content"] for r in rows["test"] + rows["validation"]}
    trained = {r["prompt"][0]["content"] for r in rows["sft"] + rows["pairs"]}
    assert len(held_out) == 50 and not held_out & trained
    # Labels follow the reward: chosen beats rejected in most pairs (Bradley-Terry with noise).
    wins = [reward(Prompt.parse(r["prompt"][0]["content"]), r["chosen"][0]["content"], config.reward)
            >= reward(Prompt.parse(r["prompt"][0]["content"]), r["rejected"][0]["content"], config.reward)
            for r in rows["pairs"]]
    assert 0.75 < sum(wins) / len(wins) < 1.0


def test_default_config_loads_and_names_every_method():
    config = DemoConfig.load()
    assert {"DPO", "SimPO", "VanillaKD", "SeqKD", "DCKD", "ADPA", "ADPA+"} <= set(config.methods)
    assert all(len(m.candidates()) == 4 for m in config.methods.values())  # the same tuning budget for each
    assert yaml.safe_load(DEFAULT_CONFIG.read_text())["world"]["seed"] == 0


def test_every_demo_training_runs_in_fp32(tmp_path):
    """TRL's configs default to bf16 autocast, which a CPU without bf16 units emulates (slowly), and which
    would train stage 0 and the TRL baselines at another precision than the distilled students."""
    from adpa.demo.stage0 import common_args
    from adpa.training.distill_config import DistillConfig
    from adpa.training.stage0 import CPOConfig, DPOConfig, SFTConfig

    args = common_args(tmp_path, steps=10, lr=1e-3, batch_size=4, seed=0)
    for config_class in (SFTConfig, DPOConfig, CPOConfig, DistillConfig):
        config = config_class(**args)
        assert not config.bf16 and not config.fp16, config_class.__name__


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    config = DemoConfig.model_validate(SMALL_RESEARCH)
    with children_unmeasured():  # the services: the test below measures the demo's processes
        results = run_research([config], workdir, command="adpa demo --config small.yaml")
    write_research(results, workdir / "out")
    return workdir, results


@pytest.mark.slow
def test_small_demo_end_to_end(small_demo):
    """One replicate's own outputs, as `adpa demo` writes them for one world."""
    workdir, _ = small_demo
    world0 = workdir / "small/world-0"
    rows = json.loads((world0 / "results.json").read_text())["methods"]
    assert {"Teacher (DPO)", "Teacher SFT (reference)", "Student (untrained)", "SFT", "DCKD", "ADPA"} <= set(rows)
    for name in ("DCKD", "ADPA"):
        for mode in ("greedy", "sampled"):
            assert -3 < rows[name][f"reward_{mode}"]["mean"] <= 1.5
            assert rows[name][f"reward_{mode}"]["n"] == 1  # one seed
    assert rows["ADPA"]["win_rate_vs_ADPA_greedy"]["mean"] == pytest.approx(0.5)  # against itself: all ties
    for name in ("results.json", "results.md", "results.png"):
        assert (world0 / name).stat().st_size > 0
    assert "| ADPA |" in (world0 / "results.md").read_text()
    # Every teacher signal went over gRPC: the services logged their start and a clean stop.
    assert "stopped" in (world0 / "logs/teacher.log").read_text()
    assert json.loads((world0 / "results.json").read_text())["environment"]["torch_threads"] == 1


@pytest.mark.slow
def test_the_world_teaches_something(small_demo):
    """DPO improves the teacher over its SFT reference, and the teacher beats the SFT student (over both worlds)."""
    rows = small_demo[1]["worlds"]["small"]["methods"]
    dpo = rows["Teacher (DPO)"]["reward_greedy"]["mean"]
    assert dpo > rows["Teacher SFT (reference)"]["reward_greedy"]["mean"] + 0.1
    assert dpo > rows["SFT"]["reward_greedy"]["mean"] + 0.1
    assert rows["SFT"]["reward_greedy"]["mean"] > rows["Student (untrained)"]["reward_greedy"]["mean"] + 0.3


@pytest.mark.slow
def test_tuning_worlds_test_worlds_and_primary_decisions(small_demo):
    workdir, results = small_demo
    world = results["worlds"]["small"]
    assert (world["worlds"], world["seeds"], world["prompts"]) == (2, 1, 40)
    assert world["tuning_world_seeds"] == [0] and world["world_seeds"] == [1, 2]
    # Test worlds are different worlds with their own test prompts, teachers and students.
    tests = [(workdir / f"small/world-{r}/data/test.jsonl").read_text() for r in (0, 1)]
    assert tests[0] != tests[1]
    records = [json.loads((workdir / f"small/world-{r}/replicate.json").read_text()) for r in (0, 1)]
    tuning = json.loads((workdir / "small/tuning-0/replicate.json").read_text())
    assert [r["world_seed"] for r in records] == [1, 2] and tuning["world_seed"] == 0
    assert records[0]["rewards"]["SFT"]["greedy"] != records[1]["rewards"]["SFT"]["greedy"]
    for record in records:
        for name, by_mode in record["rewards"].items():
            assert [len(seed) for seed in by_mode["sampled"]] == [40], name  # seeds x prompts
        # Settings come from the tuning world only; test worlds search nothing.
        assert record["settings"] == tuning["settings"] and record["search"] == {}
        # ADPA+ starts from this world's own DCKD student (DCKD's chosen setting, same seed).
        assert record["init_models"]["ADPA+"] == [str(workdir / "small" / f"world-{record['replicate'] - 1}" / "models"
                                                      / "students" / "dckd" / "learning_rate0.001-seed0")]
        assert record["steps"] == {"DCKD": 12, "ADPA": 12, "ADPA+": 24}
    # Every method's grid, as written, searched in the tuning world: ADPA two settings, the others one.
    assert {n: s["settings_tried"] for n, s in world["search"].items()} == {"DCKD": 1, "ADPA": 2, "ADPA+": 1}
    # The primary claims, decided over the two test worlds with Holm over both.
    primary = results["primary"]
    assert [e["key"] for e in primary] == ["T1.6", "T1.7"]
    for entry in primary:
        assert len(entry["per_world"]) == 2 and entry["low"] <= entry["mean"] <= entry["high"]
        assert entry["p_t"] <= entry["p_holm"] <= 1 and entry["verdict"] in ("holds", "reversed", "undecided")
    diff = world["methods"]["DCKD"]["diff_vs_ADPA_sampled"]
    assert primary[0]["mean"] == pytest.approx(-diff["mean"])
    env = results["environment"]
    assert env["packages"]["torch"] and env["cpu"]["flags"] and env["torch_threads"] == 1
    assert len(env["git_commit"]) == 40 and isinstance(env["git_code_changes"], int)  # taken when the run started
    report = (workdir / "out/results.md").read_text()
    assert "adpa demo --config small.yaml" in report and report.index("Pre-registered primary claims") < report.index(
        "Exploratory")
    assert (workdir / "out/results.png").stat().st_size > 0
    saved = json.loads((workdir / "out/results.json").read_text())
    assert saved["primary"] == json.loads(json.dumps(primary)) and saved["preregistration"]["small"]


@pytest.mark.slow
def test_a_rerun_reuses_finished_replicates(small_demo):
    workdir, results = small_demo
    config = DemoConfig.model_validate(SMALL_RESEARCH)
    stamps = {p: p.stat().st_mtime_ns for p in workdir.glob("small/*/replicate.json")}
    assert len(stamps) == 3  # the tuning world and two test worlds
    again = run_research([config], workdir)  # nothing trains: every replicate's record matches
    assert again["worlds"]["small"]["reused_worlds"] == 3
    assert again["worlds"]["small"]["methods"] == results["worlds"]["small"]["methods"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Another config (here: one more seed) is not reused: its records would not match.
    changed = config.model_copy(update={"seeds": 3})
    from adpa.demo.research import _fingerprint

    assert _fingerprint(changed, 1, 3, None) != json.loads((workdir / "small/world-0/replicate.json").read_text())["fingerprint"]


def test_another_world_seed_and_reward_mix_need_only_config(tmp_path):
    """A config alone changes the world and the reward the pipeline scores with (no training here:
    the end-to-end run above shows the pipeline itself)."""
    config = DemoConfig.model_validate({
        **SMALL,
        "world": {**SMALL["world"], "seed": 1, "num_test": 10,
                  "reward": {"task": 2.0, "style": 0.0, "harm": 0.5, "verbosity": 0.0}},
    })
    run = DemoRun(config, tmp_path)
    run.write_world()
    test_prompts = [json.loads(line)["prompt"] for line in (tmp_path / "data/test.jsonl").read_text().splitlines()]
    assert test_prompts[0][0]["content"] == World(config.world).prompt().text  # the seed-1 world
    assert test_prompts[0][0]["content"] != World(DemoConfig.load().world).prompt().text
    # The pipeline's reward uses the config's weights: task 2, style 0, harm 0.5, verbosity 0.
    prompt = Prompt("reverse", ("fox", "red", "owl"), polite=True)
    chat = [{"role": "user", "content": prompt.text}]
    assert run.reward([chat, chat], ["owl red fox", "owl red fox stupid bye"]) == pytest.approx([2.0, 1.5])


def every_method_config(jobs: int, only: tuple[str, ...] | None = None) -> dict:
    """The smallest world that trains every method of demo/default.yaml (each grid cut to its first
    setting; DPO keeps two learning rates, so a search with a choice runs in a worker too), or `only`
    these methods of it."""
    methods = {name: {**m.model_dump(), "grid": {k: v[:1] for k, v in m.grid.items()}}
               for name, m in DemoConfig.load().methods.items() if only is None or name in only}
    methods["DPO"]["grid"]["learning_rate"] = [3.0e-4, 1.0e-3]
    return {"name": "tiny", "world": {"num_sft": 300, "num_pairs": 100, "num_validation": 10, "num_test": 20},
            "teacher_sft": {"steps": 30, "lr": 3.0e-3}, "teacher_dpo": {"steps": 10, "lr": 1.0e-4, "options": {"beta": 0.1}},
            "student_sft": {"steps": 20, "lr": 1.0e-2}, "steps": 6, "batch_size": 8, "torch_threads": 1,
            "jobs": jobs, "methods": methods}


# One method of each kind the schedule treats apart: teacher-free (DPO, with a two-setting search), the
# teacher's weights only (SeqKD), the services (ADPA, whose row the win rates are against).
ONE_OF_EACH_KIND = ("DPO", "SeqKD", "ADPA")


@pytest.mark.slow
def test_every_method_end_to_end_and_workers_reproduce_one_process(tmp_path, monkeypatch):
    """`adpa demo` trains every method through the services with `jobs: 2` (the SFT student and the
    teacher-free methods beside the teachers, SeqKD as soon as the teacher's weights exist, two methods
    at a time in worker processes); `jobs: 1`, one process, reproduces a method of each kind and stage
    0 bit for bit (settings, rewards, win rates, examples, every curve in the same order). Then `adpa
    bench demo`'s own machinery (timing, the table compared with a baseline) on a stub of the run."""
    import subprocess
    import time

    from adpa.bench import demo_time
    from adpa.cli import main as cli_main

    workdirs, seconds = {}, {}
    for jobs, only in ((2, None), (1, ONE_OF_EACH_KIND)):
        config = tmp_path / f"jobs{jobs}.yaml"
        config.write_text(yaml.safe_dump(every_method_config(jobs, only)))
        workdirs[jobs] = tmp_path / f"jobs{jobs}"
        started = time.perf_counter()
        assert cli_main(["demo", "--config", str(config), "--workdir", str(workdirs[jobs])]) == 0
        seconds[jobs] = time.perf_counter() - started
    two, one = (json.loads((workdirs[j] / "results.json").read_text()) for j in (2, 1))
    assert set(DemoConfig.load().methods) <= set(two["methods"])
    assert two["config"]["jobs"] == 2 and 0 < two["seconds"] <= seconds[2]
    assert [m for m in two["methods"] if m in one["methods"]] == list(one["methods"])  # the config's order
    assert [c for c in two["curves"] if c in one["curves"]] == list(one["curves"])
    assert len(one["methods"]["DPO"]["validation"]) == 2
    assert one["methods"]["DPO"]["validation"] == two["methods"]["DPO"]["validation"]
    subset = {"methods": {m: two["methods"][m] for m in one["methods"]},
              "curves": {c: two["curves"][c] for c in one["curves"]}}
    table = demo_time.compare_tables(subset, one)
    assert table["identical"], table["differences"]
    # every row's fields and every curve were compared, and were equal
    assert table["values_equal"] == len(one["methods"]) * len(ROW_FIELDS) + len(one["curves"])
    for jobs in (1, 2):  # the services stopped cleanly when each run ended
        assert "stopped" in (workdirs[jobs] / "logs/teacher.log").read_text()

    # `adpa bench demo --baseline`: its run of `adpa demo` (a new process per repeat) stubbed by one that
    # writes the jobs-2 table again.
    commands = []

    def demo_process(command, **kwargs):
        commands.append(command)
        workdir = Path(command[command.index("--workdir") + 1])
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps(two))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(demo_time.subprocess, "run", demo_process)
    alone = tmp_path / "alone.json"  # no baseline: timed only
    assert cli_main(["bench", "demo", "--config", str(tmp_path / "jobs2.yaml"), "--out", str(alone),
                     "--workdir", str(tmp_path / "alone")]) == 0
    assert "table" not in json.loads(alone.read_text())["runs"][0] and commands.pop()
    out = tmp_path / "time.json"
    assert cli_main(["bench", "demo", "--config", str(tmp_path / "jobs2.yaml"), "--repeats", "2",
                     "--baseline", str(workdirs[2] / "results.json"), "--out", str(out)]) == 0
    assert [c[1:4] for c in commands] == [["-m", "adpa.cli", "demo"]] * 2
    assert all(c[c.index("--config") + 1] == str(tmp_path / "jobs2.yaml") for c in commands)
    doc = json.loads(out.read_text())
    assert len(doc["runs"]) == 2 and doc["wall_s_min"] <= doc["wall_s_median"]
    for run in doc["runs"]:
        assert run["jobs"] == 2 and run["pipeline_s"] == two["seconds"] and run["wall_s"] >= 0
        assert run["table"]["identical"], run["table"]["differences"]
        assert run["table"]["values_equal"] == len(two["methods"]) * len(ROW_FIELDS) + len(two["curves"])
