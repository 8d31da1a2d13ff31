"""Stage-0 trainers (TRL) through the `adpa train` CLI, and `adpa eval` with both kinds of reward.

One training runs `adpa` in a subprocess, as a user does; the others, and the evaluation, call the
same entry points in this process, sparing a process start (seconds of imports) each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from adpa.tiny_model import build_tokenizer, make_tiny_model
from adpa.training.cli import train_main
from adpa.training.evaluate import EvalResult, evaluate, load_reward, win_rate

from .test_training import make_records

COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
          "--save_strategy", "no", "--disable_tqdm", "true", "--learning_rate", "1e-3"]


def count_thanks(prompts, responses) -> list[float]:
    """A reward for tests: how often the response says thanks."""
    return [float(r.split().count("thanks")) for r in responses]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stage0") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_records(8, seed=1)))
    return path


@pytest.fixture(scope="module")
def base(models_dir) -> Path:
    return make_tiny_model(models_dir / "base", layers=1, hidden=32, heads=2, seed=7)


def adpa_train(method: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adpa.cli", "train", method, *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_train_command_trains_and_saves(tmp_path, data, base):
    out = tmp_path / "sft"
    proc = adpa_train("sft", "--model", str(base), "--dataset", str(data), "--output_dir", str(out), *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_changed(out, base)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_stage0_methods_train_and_save(tmp_path, data, base, method):
    out = tmp_path / method
    assert train_main([method, "--model", str(base), "--dataset", str(data), "--output_dir", str(out), *COMMON]) == 0
    assert_changed(out, base, method)


def assert_changed(out: Path, base: Path, method: str = "sft") -> None:
    trained = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(base)
    changed = any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), original.state_dict().values()))
    assert changed, f"{method} did not change the weights"


@pytest.mark.slow
def test_seqkd_trains_on_teacher_generations(tmp_path, data, base, teacher_path):
    out = tmp_path / "seqkd"
    assert train_main(["seqkd", "--model", str(base), "--dataset", str(data), "--output_dir", str(out),
                       "--teacher_model", str(teacher_path), *COMMON]) == 0
    assert (out / "model.safetensors").exists()


def test_train_cli_explains_bad_input(data, base, tmp_path, capsys):
    """In process: a bad method or value prints one line to stderr and returns 2 (no traceback)."""
    assert train_main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nonsense'" in err and "adpa-plus" in err
    assert train_main(["adpa", "--model", str(base), "--dataset", str(data), "--output_dir", str(tmp_path),
                       "--rollout", "sometimes"]) == 2
    assert "rollout must be one of" in capsys.readouterr().err
    assert train_main(["adpa-release", "--model", str(base), "--dataset", str(data), "--output_dir", str(tmp_path),
                       "--support", "indices"]) == 2
    assert "adpa-release accepts support ['topk'] only" in capsys.readouterr().err


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 4]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_eval_with_a_python_reward_and_a_baseline(tmp_path, data, base, teacher_path):
    prompts = [r["prompt"] for r in make_records(6, seed=2)]
    reward = load_reward("tests.test_stage0_eval:count_thanks")
    ours = evaluate(str(teacher_path), prompts, reward, max_new_tokens=6)
    ours.to_json(tmp_path / "ours.json")
    theirs = evaluate(str(base), prompts, reward, baselines={"ours": EvalResult.from_json(tmp_path / "ours.json")},
                      max_new_tokens=6)
    for mode in ("greedy", "sampled"):
        expected = [float(r.split().count("thanks")) for r in theirs.modes[mode].responses]
        assert theirs.modes[mode].rewards == expected
        assert theirs.modes[mode].mean_reward == pytest.approx(sum(expected) / len(expected))
        assert theirs.modes[mode].win_rate["ours"] == pytest.approx(
            win_rate(theirs.modes[mode].rewards, ours.modes[mode].rewards))
    # Greedy decoding is deterministic: the same model gives the same responses again.
    assert evaluate(str(teacher_path), prompts, reward, max_new_tokens=6).modes["greedy"].responses == \
        ours.modes["greedy"].responses


@pytest.mark.slow
def test_eval_cli_with_a_reward_model(tmp_path, data, teacher_path, capsys):
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    from adpa.cli import main as cli_main

    assert cli_main(["eval", "--model", str(teacher_path), "--prompts", str(data), "--reward", str(tmp_path / "rm"),
                     "--out", str(tmp_path / "eval.json"), "--max-new-tokens", "5", "--max-records", "3"]) == 0
    result = EvalResult.from_json(tmp_path / "eval.json")
    assert result.num_prompts == 3 and len(result.modes["sampled"].rewards) == 3
    assert len(set(result.modes["greedy"].rewards)) > 1  # a real model scores different responses differently
    assert "reward greedy" in capsys.readouterr().out
