"""The built-in world, and a shrunken demo end to end (services, two methods, evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adpa.demo.config import DEFAULT_CONFIG, DemoConfig
from adpa.demo.pipeline import DemoRun, write_results
from adpa.demo.world import Prompt, RewardWeights, World, WorldConfig, reward

SMALL = {
    "world": {"num_sft": 600, "num_pairs": 300, "num_validation": 20, "num_test": 60},
    "teacher_sft": {"steps": 150, "lr": 3.0e-3, "batch_size": 32},
    "teacher_dpo": {"steps": 40, "lr": 1.0e-4, "batch_size": 32, "options": {"beta": 0.1}},
    "student_sft": {"steps": 60, "lr": 1.0e-2, "batch_size": 32},
    "steps": 12,
    "batch_size": 8,
    "methods": {
        "DCKD": {"method": "dckd", "grid": {"learning_rate": [1.0e-3]}},
        "ADPA": {"method": "adpa", "grid": {"learning_rate": [1.0e-3], "gamma": [1.0, 10.0]},
                 "options": {"support": "indices", "student_k": 4, "support_k": 4, "support_floor": 1.0e-3}},
    },
}


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


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    results = DemoRun(DemoConfig.model_validate(SMALL), workdir).run()
    write_results(results, workdir)
    return workdir, results


def test_small_demo_end_to_end(small_demo):
    workdir, results = small_demo
    rows = results["methods"]
    assert {"Teacher (DPO)", "Teacher SFT (reference)", "Student (untrained)", "SFT", "DCKD", "ADPA"} <= set(rows)
    assert rows["ADPA"]["setting"]["gamma"] in (1.0, 10.0)
    assert [v["gamma"] for v in rows["ADPA"]["validation"]] == [1.0, 10.0]
    for name in ("DCKD", "ADPA"):
        for mode in ("greedy", "sampled"):
            assert -3 < rows[name][f"reward_{mode}"]["mean"] <= 1.5
    assert rows["ADPA"]["win_rate_vs_ADPA_greedy"]["mean"] == pytest.approx(0.5)  # against itself: all ties
    for name in ("results.json", "results.md", "results.png"):
        assert (workdir / name).stat().st_size > 0
    assert "| ADPA |" in (workdir / "results.md").read_text()
    # Every teacher signal went over gRPC: the services logged their start and a clean stop.
    assert "stopped" in (workdir / "logs/teacher.log").read_text()


def test_the_world_teaches_something(small_demo):
    """DPO improves the teacher over its SFT reference, and the teacher beats the SFT student."""
    rows = small_demo[1]["methods"]
    dpo = rows["Teacher (DPO)"]["reward_greedy"]["mean"]
    assert dpo > rows["Teacher SFT (reference)"]["reward_greedy"]["mean"] + 0.1
    assert dpo > rows["SFT"]["reward_greedy"]["mean"] + 0.1
    assert rows["SFT"]["reward_greedy"]["mean"] > rows["Student (untrained)"]["reward_greedy"]["mean"] + 0.3


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
