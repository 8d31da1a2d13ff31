"""The research machinery without training: the grid-extension rule, the bootstrap intervals, the
research configs' fairness, the second world, and `adpa demo`'s flags. (The replicate pipeline end to
end, on a shrunken config, is in tests/test_demo.py: one demo run per suite.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from adpa.cli import main
from adpa.demo.config import DemoConfig
from adpa.demo.research import QUESTIONS
from adpa.demo.search import candidates, edges, next_rung, search
from adpa.demo.stats import bootstrap, paired_difference, run_means, verdict, win_rate
from adpa.demo.world import Prompt, World, reward

EXPERIMENTS = ("demo/experiments/paper.yaml", "demo/experiments/credit.yaml", "demo/experiments/habit.yaml")


# -- the grid-extension rule --------------------------------------------------------------------


def peak(center: dict[str, float]):
    """A validation score with one peak at `center` (log distance), and a log of what was scored."""
    scored = []

    def score(setting):
        scored.append(dict(setting))
        return -sum(math.log10(setting[k] / v) ** 2 for k, v in center.items())

    return score, scored


def test_next_rung_continues_the_ladder():
    assert next_rung([1.0, 10.0, 100.0], "up") == 1000.0
    assert next_rung([1.0, 10.0, 100.0], "down") == 0.1
    assert next_rung([1e-3, 3e-3, 1e-2], "up") == 0.0333  # 1e-2 * (1e-2 / 3e-3), 3 significant digits
    assert next_rung([3e-3, 1e-3, 1e-2], "down") == 0.000333  # unsorted input is fine
    with pytest.raises(ValueError, match="direction"):
        next_rung([1.0, 2.0], "left")


def test_an_interior_choice_is_not_extended():
    score, scored = peak({"learning_rate": 3e-3, "gamma": 10.0})
    result = search({"learning_rate": [1e-3, 3e-3, 1e-2], "gamma": [1.0, 10.0, 100.0]}, score, max_extensions=2)
    assert result.best == {"learning_rate": 3e-3, "gamma": 10.0}
    assert result.extensions == [] and result.at_edge == [] and len(scored) == 9


def test_an_edge_choice_grows_the_grid_until_it_is_inside():
    score, scored = peak({"learning_rate": 3e-3, "gamma": 1000.0})
    result = search({"learning_rate": [1e-3, 3e-3, 1e-2], "gamma": [1.0, 10.0, 100.0]}, score, max_extensions=3)
    # gamma grows 100 -> 1000 (best at the new edge) -> 10000 (now inside); each new rung crosses every lr.
    assert result.extensions == [{"axis": "gamma", "direction": "up", "value": 1000.0},
                                 {"axis": "gamma", "direction": "up", "value": 10000.0}]
    assert result.best == {"learning_rate": 3e-3, "gamma": 1000.0}
    assert result.at_edge == [] and len(scored) == 9 + 3 + 3
    assert len({tuple(s.items()) for s in scored}) == len(scored)  # nothing trained twice
    assert result.record()["settings_tried"] == 15


def test_the_cap_is_kept_and_reported():
    score, scored = peak({"learning_rate": 1e-6, "gamma": 1e6})
    result = search({"learning_rate": [1e-3, 3e-3, 1e-2], "gamma": [1.0, 10.0, 100.0]}, score, max_extensions=3)
    # Both axes at an edge: both grow in one round (2 rungs), then one more (the cap), lr first.
    assert [(e["axis"], e["direction"]) for e in result.extensions] == [
        ("learning_rate", "down"), ("gamma", "up"), ("learning_rate", "down")]
    assert result.at_edge == [("learning_rate", "down"), ("gamma", "up")]
    assert result.record()["still_at_edge"] == ["learning_rate down", "gamma up"]
    assert result.grid["learning_rate"] == [1.11e-4, 3.33e-4, 1e-3, 3e-3, 1e-2]  # the end rungs set the ratio
    assert len(scored) == 9 + (16 - 9) + (20 - 16)  # 3x3, then 4x4 (both axes grew), then 5x4


def test_no_extension_when_disabled_and_ties_go_to_the_first():
    score, scored = peak({"learning_rate": 1.0})
    result = search({"learning_rate": [1e-3, 1e-2]}, score, max_extensions=0)
    assert result.best == {"learning_rate": 1e-2} and result.extensions == []
    assert result.at_edge == [("learning_rate", "up")]  # reported even when not extended
    flat = search({"x": [1.0, 2.0, 3.0]}, lambda s: 0.0, max_extensions=2)
    # All tie: the first trained wins; it sits at the low edge, so the grid grows down once, after
    # which the (still first) choice is inside.
    assert flat.best == {"x": 1.0} and [e["value"] for e in flat.extensions] == [0.5] and flat.at_edge == []


def test_axes_that_cannot_grow():
    grid = {"support": ["topk", "indices"], "gamma": [1.0], "flag": [True, False], "shift": [0.0, 1.0]}
    for setting in candidates(grid):
        assert edges(grid, setting) == []
    result = search(grid, lambda s: float(s["shift"]), max_extensions=3)
    assert result.extensions == [] and result.best["shift"] == 1.0


def test_research_configs_keep_their_worlds_and_share_their_methods():
    default = DemoConfig.load()
    paper, credit, habit = (DemoConfig.load(p) for p in EXPERIMENTS)
    for field in ("world", "teacher", "student", "teacher_sft", "teacher_dpo", "student_sft", "beta", "steps",
                  "batch_size", "max_new_tokens"):
        assert getattr(paper, field) == getattr(default, field), field
    assert set(paper.methods) == set(credit.methods) == set(habit.methods)
    assert paper.primary == credit.primary == habit.primary
    names = set(paper.methods) | {"SFT", "Teacher (DPO)", "Teacher SFT (reference)"}
    matched = next(q for q in QUESTIONS if q.key == "Q0")  # ADPA+ against ADPA at matched compute
    assert {matched.better, matched.worse} <= names
    assert len({paper.name, credit.name, habit.name}) == 3 and credit.about.strip() and habit.about.strip()
    # The third world is the first one with the shared filler habit added, and nothing else changed.
    changed = {k for k in type(paper.world).model_fields if getattr(paper.world, k) != getattr(habit.world, k)}
    assert changed == {"seed", "reward", "demonstrator", "teacher_sft_filler"}
    assert habit.world.reward.filler > 0 and habit.world.teacher_sft_filler > habit.world.demonstrator.p_filler


# -- intervals ----------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_and_covers_the_truth():
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 1.0, (3, 2, 200))
    a = bootstrap(noise, seed=0)
    assert a == bootstrap(noise, seed=0)
    assert a.low < a.mean < a.high and a.low < 0 < a.high
    shifted = bootstrap(noise + 0.5, seed=0)
    assert shifted.excludes(0) and verdict(shifted) == "holds" and shifted.worlds_positive == 3
    assert verdict(bootstrap(noise - 0.5)) == "reversed" and verdict(a) == "undecided"


def test_the_interval_includes_the_spread_between_worlds():
    """A world-level effect that flips sign across worlds must not look like a result."""
    rng = np.random.default_rng(2)
    world_effect = np.array([0.6, -0.3, 0.2])[:, None, None]
    values = world_effect + rng.normal(0.0, 0.05, (3, 2, 400))
    wide = bootstrap(values)
    assert wide.low < 0 < wide.high  # the worlds disagree: undecided
    prompts_only = bootstrap(values[:1])  # one world: prompts and seeds only, narrow around 0.6
    assert prompts_only.low > 0.55 and prompts_only.high < 0.65


def test_paired_difference_win_rate_and_means():
    rng = np.random.default_rng(3)
    b = rng.normal(0.0, 1.0, (2, 2, 50))
    same = win_rate(b, b)
    assert same.mean == same.low == same.high == 0.5
    diff = paired_difference(b + 1.0, b)
    assert diff.mean == pytest.approx(1.0) and diff.low == pytest.approx(1.0) and diff.high == pytest.approx(1.0)
    assert win_rate(b + 1.0, b).mean == 1.0
    means = run_means(np.arange(8.0).reshape(2, 2, 2))  # run means 0.5, 2.5, 4.5, 6.5
    assert means == {"mean": 3.5, "std": pytest.approx(np.std([0.5, 2.5, 4.5, 6.5], ddof=1)), "n": 4}
    with pytest.raises(ValueError, match="shape"):
        paired_difference(b, b[:1])
    with pytest.raises(ValueError, match="worlds, seeds, prompts"):
        bootstrap(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        bootstrap(np.full((1, 1, 2), np.nan))


# -- the second world ---------------------------------------------------------------------------


def test_the_credit_world_has_its_mid_sequence_habit():
    config = DemoConfig.load("demo/experiments/credit.yaml").world
    world = World(config)
    prompts = [world.prompt() for _ in range(400)]
    assert {p.task for p in prompts} == {"sort", "reverse", "copy"}
    assert all(4 <= len(p.items) <= 6 for p in prompts)
    repeated = 0
    for p in prompts:
        answer, middle = p.answer(), len(p.answer()) // 2
        body = [w for w in world.demonstrate(p).split() if w not in ("thanks", "bye", "stupid", "ugly")]
        repeated += body[middle - 1:middle + 1] == [answer[middle - 1]] * 2
    assert 0.7 < repeated / len(prompts) < 0.9  # p_habit 0.8, less what later random errors undo
    # The repeat shifts every later item and loses the exact-answer bonus: it costs 1 + 3/5 + 0.1 here.
    p = Prompt("copy", ("red", "blue", "cat", "dog", "fox"), polite=False)
    assert reward(p, "red blue cat dog fox", config.reward) == pytest.approx(2.5)
    assert reward(p, "red blue blue cat dog fox", config.reward) == pytest.approx(2.5 - 1.0 - 3 / 5 - 0.1)
    swap = World(config.model_copy(update={"demonstrator": config.demonstrator.model_copy(
        update={"habit": "swap", "p_habit": 1.0, "p_correct": 1.0, "p_rude": 0.0, "p_closing": {"": 1.0}})}))
    assert swap.demonstrate(Prompt("copy", ("red", "blue", "cat", "dog"), False)) == "red cat blue dog"


def test_the_habit_world_shares_its_filler_between_teacher_corpus_and_pairs(tmp_path):
    config = DemoConfig.load("demo/experiments/habit.yaml").world.model_copy(
        update={"num_sft": 1000, "num_pairs": 600, "num_validation": 10, "num_test": 10})
    import json

    from adpa.demo.world import has_filler

    paths = World(config).write(tmp_path)
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    rate = lambda texts: sum(map(has_filler, texts)) / len(texts)  # noqa: E731
    assert 0.85 < rate([r["completion"][0]["content"] for r in rows["teacher_sft"]]) < 0.95
    assert 0.05 < rate([r["completion"][0]["content"] for r in rows["sft"]]) < 0.15
    pairs = rows["pairs"]
    assert all(has_filler(r["chosen"][0]["content"]) == has_filler(r["rejected"][0]["content"]) for r in pairs)
    p = Prompt("copy", ("red", "blue", "cat"), polite=False)
    assert reward(p, "red blue cat", config.reward) - reward(p, "red blue cat please", config.reward) == pytest.approx(1.1)
    # The other worlds' data do not change with the new options off.
    plain = DemoConfig.load("demo/experiments/paper.yaml").world.model_copy(update={"num_sft": 50, "num_pairs": 20})
    assert "teacher_sft" not in World(plain).write(tmp_path / "plain")


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--worlds", "0"), ("--worlds", "two"), ("--seeds", "-1")])
def test_demo_refuses_bad_counts(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a whole number >= 1" in capsys.readouterr().err


def test_demo_help_names_the_research_flags(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--worlds", "--seeds", "--config", "--out", "--workdir"):
        assert flag in out


def test_demo_refuses_two_configs_with_one_name(tmp_path, capsys):
    assert main(["demo", "--config", EXPERIMENTS[0], "--config", EXPERIMENTS[0], "--workdir", str(tmp_path)]) == 2
    assert "its own `name`" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("worlds: 0\n")
    assert main(["demo", "--config", str(bad), "--workdir", str(tmp_path)]) == 2
    assert "worlds" in capsys.readouterr().err
