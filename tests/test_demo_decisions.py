"""The world-level decisions of the research report on synthetic differences with known answers, Holm's
adjustment, the split of tuning and test worlds, and ADPA+'s start from DCKD's student. No training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adpa.demo.config import DemoConfig
from adpa.demo.research import choose_settings, decide_primary, per_world_difference, tuning_config, world_seeds
from adpa.demo.schedule import derived_inputs, sources
from adpa.demo.stats import decide, holm, sign_flip_p, t_quantile, t_two_sided_p, world_test

EXPERIMENTS = sorted(Path(__file__).resolve().parents[1].joinpath("demo/experiments").glob("*.yaml"))
RESEARCH = [p for p in EXPERIMENTS if DemoConfig.load(p).primary]


def test_t_distribution_matches_tables():
    assert t_quantile(0.975, 7) == pytest.approx(2.3646, abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_two_sided_p(2.3646, 7) == pytest.approx(0.05, abs=1e-4)
    assert t_two_sided_p(1.0, 3) == pytest.approx(0.3910, abs=1e-4)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_world_test_finds_a_true_effect_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    d = 0.3 + 0.1 * rng.standard_normal(8)  # 8 worlds, a true mean difference of 0.3
    test = world_test(d)
    assert test.p_t < 1e-4 and test.p_sign_flip == pytest.approx(2 / 256)
    assert test.low < 0.3 < test.high and test.worlds_positive == 8
    assert decide(test.mean, holm([test.p_t, 0.5, 0.9])[0]) == "holds"
    assert decide(-test.mean, test.p_t) == "reversed"


def test_world_test_rejects_a_null_about_five_percent_of_the_time():
    rng = np.random.default_rng(1)
    draws = rng.standard_normal((2000, 8)) * rng.uniform(0.1, 2.0, (2000, 1))  # no effect, varied spread
    tests = [world_test(d) for d in draws]
    assert 0.03 < np.mean([t.p_t < 0.05 for t in tests]) < 0.065
    assert np.mean([t.p_sign_flip < 0.05 for t in tests]) < 0.065
    covered = np.mean([t.low <= 0.0 <= t.high for t in tests])
    assert 0.935 < covered < 0.97


def test_holm_known_answers_and_family_wise_error_under_the_null():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.001, 0.001]) == pytest.approx([0.002, 0.002])
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(2)
    # 15 null tests (5 claims x 3 world kinds) of 8 worlds each: any false verdict in at most ~5% of runs.
    any_false = [min(holm([world_test(d).p_t for d in rng.standard_normal((15, 8))])) < 0.05 for _ in range(400)]
    assert np.mean(any_false) < 0.08
    # Without the correction most runs would declare something.
    raw = [min(world_test(d).p_t for d in rng.standard_normal((15, 8))) < 0.05 for _ in range(200)]
    assert np.mean(raw) > 0.4


def test_sign_flip_p_counts_every_pattern():
    assert sign_flip_p(np.array([1.0, 1.0, 1.0])) == pytest.approx(2 / 8)
    assert sign_flip_p(np.array([1.0, -1.0])) == pytest.approx(1.0)


def test_per_world_difference_and_primary_decisions():
    better = np.zeros((3, 2, 4)) + np.arange(3)[:, None, None]
    assert per_world_difference(better, np.zeros((3, 2, 4))).tolist() == [0.0, 1.0, 2.0]
    worlds = {"a": {"primary": [{**world_test(np.array([0.5, 0.6, 0.55, 0.52])).as_dict(), "key": "T"}]},
              "b": {"primary": [{**world_test(np.array([0.1, -0.1, 0.05, -0.02])).as_dict(), "key": "T"}]}}
    entries = decide_primary(worlds)
    assert [e["verdict"] for e in entries] == ["holds", "undecided"]
    assert entries[0]["p_holm"] == pytest.approx(min(1.0, 2 * entries[0]["p_t"]))


@pytest.mark.parametrize("path", RESEARCH, ids=lambda p: p.stem)
def test_tuning_and_test_worlds_never_overlap(path):
    config = DemoConfig.load(path)
    tuning, test = world_seeds(config, config.worlds)
    assert config.tuning_worlds >= 1 and config.worlds >= 8
    assert len(tuning) == config.tuning_worlds and len(test) == config.worlds
    assert not set(tuning) & set(test)
    # The world seed a replicate index builds (DemoRun: world.seed + replicate) is the seed listed here.
    assert test[0] == config.world.seed + config.tuning_worlds


def test_no_world_seed_is_shared_across_the_research_configs():
    seeds = [s for p in RESEARCH for part in world_seeds(DemoConfig.load(p), DemoConfig.load(p).worlds) for s in part]
    assert len(seeds) == len(set(seeds))


@pytest.mark.parametrize("path", RESEARCH, ids=lambda p: p.stem)
def test_research_configs_preregister_the_primary_claims_with_an_equal_fixed_budget(path):
    config = DemoConfig.load(path)
    assert [c.key for c in config.primary] == ["T1.2", "T1.6", "T1.7", "T1.9", "T2.3"]
    assert {c.decoding for c in config.primary} == {config.search.select_on}  # tuned on the decided score
    assert config.search.max_extensions == 0  # the count is fixed: no extension
    tuned = tuning_config(config).methods
    assert len({len(m.candidates()) for m in tuned.values()}) == 1
    assert set(config.methods) - set(tuned) == {n for n, m in config.methods.items() if m.settings_from}
    # ADPA+ is ADPA from DCKD's student, and trains DCKD's steps and its own.
    plus = config.methods["ADPA+"]
    assert plus.method == "adpa" and plus.init_from == "DCKD" and plus.options == config.methods["ADPA"].options
    assert config.method_steps("ADPA+") == 2 * config.steps
    assert config.method_steps("ADPA (400 steps)") == config.method_steps("ADPA+")


def test_adpa_plus_starts_from_dckds_chosen_students():
    config = DemoConfig.load(RESEARCH[0])
    assert sources(config, "ADPA+") == ["DCKD"] and sources(config, "ADPA") == []
    trained = {"DCKD": {"setting": {"learning_rate": 0.01, "alpha": 1.0}, "models": ["runs/dckd-seed0", "runs/dckd-seed1"]},
               "ADPA": {"setting": {"learning_rate": 0.003, "gamma": 10.0}, "models": ["x"]}}
    setting, starts = derived_inputs(config, "ADPA+", None, trained)
    assert setting is None and [str(p) for p in starts] == ["runs/dckd-seed0", "runs/dckd-seed1"]
    setting, starts = derived_inputs(config, "ADPA (400 steps)", None, trained)
    assert setting == trained["ADPA"]["setting"] and starts is None


def test_settings_are_chosen_on_the_tuning_worlds_mean_score():
    record = lambda scores: {"search": {"DCKD": {"validation": [  # noqa: E731
        {"learning_rate": lr, "reward": r} for lr, r in scores]}}}
    one = [record([(1e-3, 0.5), (3e-3, 0.7)])]
    assert choose_settings(one) == {"DCKD": {"learning_rate": 3e-3}}
    two = [*one, record([(1e-3, 0.8), (3e-3, 0.4)])]
    assert choose_settings(two) == {"DCKD": {"learning_rate": 1e-3}}


def test_the_release_preset_draws_greedy_offline_samples():
    """docs/training.md: the release samples the student's responses greedily, once (offline), with gamma 1.6
    and the teacher's top-50 support (the adpa-release defaults)."""
    from adpa.training.methods import get_method

    spec = get_method("adpa-release")
    assert spec.defaults == {"gamma": 1.6, "support_k": 50} and spec.supports == ("topk",)
    rows = [(p, n, m) for p in [None, *EXPERIMENTS] for n, m in DemoConfig.load(p).methods.items()
            if m.method == "adpa-release"]
    assert rows
    for path, name, method in rows:
        assert method.options.get("rollout_greedy") is True, (path, name)
        assert method.options.get("rollout", "offline") == "offline", (path, name)
        assert "gamma" not in method.options and "support_k" not in method.options, (path, name)
