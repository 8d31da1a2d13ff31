"""`adpa bench`, the model presets, the FLOP count behind MFU, the plots, and the GPU suite's CPU smoke run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adpa.bench import ALIASES, BENCHMARKS, description, names
from adpa.bench.plots import main as plots_main, source_name
from adpa.bench.presets import PRESETS, build_model, model_shape, scoring_flops
from adpa.cli import main as cli_main

from .conftest import children_unmeasured

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
SUITE_PARTS = ("serving_8b", "wire", "serving_1b", "memory", "overhead", "concurrency", "fairness", "deterministic")


def test_bench_help_lists_every_benchmark_with_its_description(capsys):
    assert cli_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert set(names()) >= {"serving", "fidelity", "step_overhead", "concurrency", "prefix_sharing", "plots"}
    assert "presets" not in names() and "__main__" not in names()  # helpers are not commands
    for name in names():
        assert f"  {name} " in out
        assert " ".join(description(name).split()[:4]) in " ".join(out.split())  # its docstring's first words
    assert set(ALIASES.values()) <= set(BENCHMARKS)


def test_an_unknown_benchmark_names_the_known_ones(capsys):
    assert cli_main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "serving" in err


@pytest.mark.parametrize("bench, flag, known", [("concurrency", "--batching", "on"), ("fairness", "--modes", "ray"),
                                                 ("deterministic", "--settings", "deterministic")])
def test_an_unknown_list_value_is_named_before_any_work(bench, flag, known):
    with pytest.raises(SystemExit, match=rf"unknown {flag} value\(s\): \['nope'\]; expected some of .*'{known}'"):
        cli_main(["bench", bench, flag, f"{known},nope"])


@pytest.mark.parametrize("name", ["fuzz", "soak"])
def test_the_robustness_checks_are_no_benchmarks_and_say_where_they_went(name, capsys):
    assert name not in names() and (ROOT / "robustness" / f"{name}.py").is_file()
    assert cli_main(["bench", name]) == 2
    assert f"python robustness/{name}.py" in capsys.readouterr().err


def test_bench_runs_a_benchmark_with_its_own_flags(tmp_path):
    out = tmp_path / "fidelity.json"
    argv = ["bench", "fidelity", "--vocab", "300", "--positions", "4", "--k", "4", "--threads", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["support"] for r in rows} >= {"topk", "indices"} and all(r["k"] == 4 for r in rows)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_the_model(name):
    preset = PRESETS[name]
    with torch.device("meta"):  # no memory, no init: only the shapes
        model = build_model(preset, seed=0, device="meta", dtype="bfloat16")
    counts = preset.parameters()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    shape = model_shape(model)
    assert shape["params_body_matmul"] == counts["body_matmul"]
    assert (shape["layers"], shape["hidden"], shape["heads"], shape["kv_heads"], shape["vocab"]) == (
        preset.layers, preset.hidden, preset.heads, preset.kv_heads, preset.vocab)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # untied head


def test_the_llama_shapes_have_the_llama_sizes():
    assert PRESETS["8b"].parameters()["total"] == 8_030_261_248  # Llama-3.1-8B's count
    assert round(PRESETS["1b"].parameters()["total"] / 1e9, 2) == 1.50  # Llama-3.2-1B (1.24B tied) + its own head
    assert {PRESETS[n].vocab for n in ("tiny-128k", "1b", "3b", "8b")} == {128256}


def test_a_preset_tokenizer_reads_the_demo_world():
    from adpa.demo.world import WORDS

    tokenizer = PRESETS["tiny"].tokenizer()
    assert len(tokenizer) == PRESETS["tiny"].vocab
    ids = tokenizer(" ".join(WORDS))["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(WORDS)


def test_scoring_flops_match_what_torch_counts():
    """The formula against torch's FLOP counter on the engine's real path: the counter counts every
    matrix product (the body's linears, the head on the scored rows), and attention as the full
    L x L square; the formula counts the causal pairs, L (L + 1) / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    from adpa.protocol import SupportSpec
    from adpa.services.engine import ScoringEngine

    preset = PRESETS["tiny"]
    model = build_model(preset, seed=0)
    model.set_attn_implementation("eager")  # matmuls the counter sees (it has no formula for CPU SDPA kernels)
    engine = ScoringEngine(model, preset.tokenizer(), name="tiny", model_hash="-", batching=False,
                           min_shared_prefix=0)  # forwards in this thread, every token forwarded
    length, scored = 24, [(3, 20), (0, 23), (10, 11)]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, preset.vocab, (length,), generator=g) for _ in scored]
    with FlopCounterMode(display=False) as counter:
        engine.score(seqs, scored, SupportSpec("topk", k=8))
    positions = sum(e - s for s, e in scored)
    ours = scoring_flops(model_shape(model), [length] * len(seqs), positions)
    full_square = 4 * preset.layers * preset.heads * preset.head_dim * length * length * len(seqs)
    assert counter.get_total_flops() == ours["body"] + ours["head"] + full_square
    assert ours["attention"] == full_square * (length + 1) // (2 * length)
    assert ours["head"] == 2 * preset.hidden * preset.vocab * positions  # the scored rows only


def _fidelity_docs() -> tuple[dict, dict]:
    """bench/fidelity.py's shape (synthetic rows) and bench/fidelity_real.py's (a 'rows' list, sampled rows)."""
    def rows(supports):
        return [{"support": s, "k": k, "adpa_grad_cosine": 1 - 0.1 / k, "kl_rel_error": e / k,
                 "kl_grad_cosine": 1 - 0.01 / k} for s, e in supports for k in (4, 8, 16, 32, 64)]
    synthetic = {"config": {"vocab": 1000, "positions": 16, "zipf": [1.1, 2.5]}, "results": rows([("topk", 1.0)])}
    real = {"config": {}, "vocab_size": 77, "positions": 40, "rows": rows([("topk", 0.5), ("sampled", -0.05)])}
    real["rows"][0]["kl_rel_error"] = 0.0  # an exact zero on a log scale
    return synthetic, real


def _memory_doc() -> dict:
    points = [{"vocab": v, "positions": p, "support": s, "extra_bytes": p * (v * 4 if s == "dense" else 400),
               "cuda_extra_bytes": p * 1000}
              for v in (32000, 128256) for s in ("topk", "dense") for p in (1024, 2048, 4096)]
    return {"config": {"layers": 2, "hidden": 64, "k": 32, "logits_budget_mb": 64, "device": "cuda"}, "points": points}


def test_plots_from_json(tmp_path):
    synthetic, real = _fidelity_docs()
    (tmp_path / "fidelity_last_run.json").write_text(json.dumps(synthetic))
    (tmp_path / "fidelity_real_last_run.json").write_text(json.dumps(real))
    (tmp_path / "m.json").write_text(json.dumps(_memory_doc()))
    out = tmp_path / "docs"
    argv = ["--fidelity", str(tmp_path / "fidelity_last_run.json"), str(tmp_path / "fidelity_real_last_run.json"),
            "--memory", str(tmp_path / "m.json"), "--out-dir", str(out)]
    assert plots_main(argv) == 0
    assert [source_name(tmp_path / "x.json", d) for d in (synthetic, real)] == ["synthetic", "x"]
    for name in ("fidelity.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_skip_missing_inputs(tmp_path, capsys):
    argv = ["--fidelity", str(tmp_path / "none.json"), "--memory", str(tmp_path / "none.json"),
            "--out-dir", str(tmp_path)]
    assert plots_main(argv) == 1
    assert "not found, skipped" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def _suite(*args: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "ADPA_TORCH_THREADS": "1"}
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_the_gpu_suite_refuses_to_run_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    run = _suite(str(tmp_path / "out"), tmp_path=tmp_path, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "nvidia-smi not found" in run.stderr or "torch.cuda.is_available() is False" in run.stderr
    bad = _suite("--parts", "serving,nope", str(tmp_path / "out"), tmp_path=tmp_path, timeout=60)
    assert bad.returncode == 2 and "unknown part serving" in bad.stderr


def test_the_gpu_suites_dry_run_lists_the_gpu_commands(tmp_path):
    run = _suite("--dry-run", "--peak-tflops", "989", str(tmp_path / "out"), tmp_path=tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split()[1]: line for line in run.stdout.splitlines() if line.startswith("[suite] ")}
    assert set(SUITE_PARTS) <= set(lines)
    assert "--preset 8b --device cuda --dtype bfloat16 --skip-grpc" in lines["serving_8b"]
    assert "--preset 1b" in lines["serving_1b"] and "--peak-tflops 989" in lines["serving_1b"]
    assert all("--device cuda" in line for line in lines.values())
    assert not (tmp_path / "out" / "suite.json").exists()


# A python for the suite that records each part's benchmark command instead of running it (every other
# call goes to the real interpreter): the script's machinery is tested without training anything, and
# the recorded commands are what the tests below run.
STUB_PYTHON = """#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m adpa.cli bench" ]]; then
  shift 3; out=""; prev=""
  for a in "$@"; do [[ "$prev" == "--out" ]] && out="$a"; prev="$a"; done
  "$REAL_PYTHON" -c 'import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], "w"))' "$out" "$@"
  [[ ",$STUB_FAIL," != *",$1,"* ]] || { echo "stub: $1 fails" >&2; exit 3; }
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _stub_suite(tmp_path: Path, *args: str, fail: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "STUB_FAIL": fail,
           "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", str(SUITE), *args, str(out)], capture_output=True, text=True, env=env, timeout=120)
    return run, out


def test_the_gpu_suite_runs_and_records_every_part(tmp_path):
    """--smoke with a stub for the benchmarks: each part's command runs once, in order, its JSON and exit
    status land in suite.json; a failing part makes the suite exit 1 and the others still run."""
    run, out = _stub_suite(tmp_path, "--smoke", "--peak-tflops", "1")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["smoke"] and suite["peak_tflops"] == 1.0 and suite["cpus"] == os.cpu_count()
    assert [p["part"] for p in suite["parts"]] == list(SUITE_PARTS)
    assert all(p["exit"] == 0 and p["json"] == f"{p['part']}.json" for p in suite["parts"]), suite["parts"]
    commands = {p["part"]: json.loads((out / f"{p['part']}.json").read_text()) for p in suite["parts"]}
    assert all("--device" in c and c[c.index("--device") + 1] == "cpu" for c in commands.values())
    assert commands["serving_1b"][commands["serving_1b"].index("--peak-tflops") + 1] == "1"

    failed, out = _stub_suite(tmp_path, "--smoke", "--parts", "wire,memory", fail="memory")
    assert failed.returncode == 1 and "memory: FAILED (exit 3)" in failed.stdout, failed.stdout
    parts = json.loads((out / "suite.json").read_text())["parts"]
    assert [(p["part"], p["exit"]) for p in parts] == [("wire", 0), ("memory", 3)]


@pytest.fixture(scope="module")
def smoke_commands(tmp_path_factory) -> dict[str, list[str]]:
    """The `adpa bench` arguments of every part of `gpu_suite.sh --smoke`, as the script writes them."""
    tmp = tmp_path_factory.mktemp("suite")
    run, out = _stub_suite(tmp, "--smoke", "--peak-tflops", "1")
    assert run.returncode == 0, run.stderr
    return {part: json.loads((out / f"{part}.json").read_text()) for part in SUITE_PARTS}


def _serving_ok(doc: dict) -> bool:
    throughput = doc["throughput"]
    return throughput["engine_logprobs"]["mfu"] > 0 and throughput["service_advantage"]["tflops_per_s"] > 0


# What each part's JSON must hold.
SMOKE_CHECKS = {
    "serving_8b": _serving_ok,
    "serving_1b": lambda doc: _serving_ok(doc) and doc["throughput"]["grpc_teacher_advantage"]["matches_in_process"],
    "wire": lambda doc: {r["support"] for r in doc["wire"]} == {"topk", "indices", "sampled", "dense"},
    "memory": lambda doc: bool(doc["points"]),
    "overhead": lambda doc: set(doc["step_seconds"]) == {"in_process", "grpc_prefetch_0", "grpc_prefetch_2"},
    "concurrency": lambda doc: doc["points"][0]["errors"] == 0,
    "fairness": lambda doc: doc["runs"][0]["errors"] == 0 and doc["runs"][0]["max_over_min"] >= 1,
    "deterministic": lambda doc: [r["burst"]["differing"] for r in doc["runs"]][1] == 0,
}


# The parts whose servers run only code that the suite's own servers cover (see children_unmeasured).
SERVERS_MEASURED_ELSEWHERE = ("serving_1b", "overhead", "concurrency", "fairness", "deterministic")


@pytest.mark.slow
@pytest.mark.parametrize("part", SUITE_PARTS)
def test_each_gpu_suite_part_runs_on_cpu(smoke_commands, part, tmp_path):
    """The suite's own smoke command of each part, on the CPU (the numbers mean nothing here)."""
    argv = list(smoke_commands[part])
    out = tmp_path / f"{part}.json"
    argv[argv.index("--out") + 1] = str(out)
    with children_unmeasured() if part in SERVERS_MEASURED_ELSEWHERE else contextlib.nullcontext():
        assert cli_main(["bench", *argv]) == 0
    doc = json.loads(out.read_text())
    assert SMOKE_CHECKS[part](doc), doc


def test_demo_time_compares_every_table_value():
    from adpa.bench.demo_time import ROW_FIELDS, compare_tables

    row = {field: {"mean": 0.5, "std": 0.0, "n": 1} for field in ROW_FIELDS}
    baseline = {"methods": {"ADPA": row, "SFT": dict(row)}, "curves": {"ADPA (lr, seed 0)": [[1, 2.0]]}}
    same = json.loads(json.dumps(baseline))
    assert compare_tables(baseline, same) == {"identical": True, "values_equal": 2 * len(ROW_FIELDS) + 1,
                                              "differences": []}
    changed = json.loads(json.dumps(baseline))
    changed["methods"]["ADPA"]["reward_sampled"]["mean"] = 0.5000001
    changed["curves"]["ADPA (lr, seed 0)"][0][1] = 2.0000001
    del changed["methods"]["SFT"]
    result = compare_tables(baseline, changed)
    assert not result["identical"] and len(result["differences"]) == 3
    assert any("ADPA reward_sampled" in d for d in result["differences"])


def test_demo_time_refuses_bad_arguments_with_a_message(tmp_path, capsys):
    from adpa.bench.demo_time import main as demo_time_main

    with pytest.raises(SystemExit):
        demo_time_main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read --baseline"):
        demo_time_main(["--baseline", str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not an `adpa demo` results.json"):
        demo_time_main(["--baseline", str(tmp_path / "other.json")])
