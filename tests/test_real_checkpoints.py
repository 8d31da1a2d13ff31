"""Real-shaped checkpoints: a byte-level BPE tokenizer with a chat template, Qwen2 models, and
embedding matrices padded as large checkpoints pad them (`resize_token_embeddings(V + 64,
pad_to_multiple_of=128)`) on one side only.

Signals live on the shared real ids [0, len(tokenizer)): checked exact against plain transformers
on the padded model (log-softmax over every row, read at the shared ids), padding ids never in a
support, both transports, DCKD and ADPA trainings both ways, and a different tokenizer refused in
one line with exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adpa.client import TeacherClient
from adpa.protocol import SupportSpec
from adpa.tiny_model import make_real_shaped_model
from adpa.training.data import load_records
from adpa.training.teacher import LocalTeacher

from .conftest import SERVER_ENV, children_unmeasured, start_service
from .test_training import config, losses_of, make_records


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """Teacher and reference padded and not (the same real rows for a seed), and two students."""
    root = tmp_path_factory.mktemp("real")
    build = {
        "teacher_padded": dict(seed=1, pad_vocab_to=128), "teacher": dict(seed=1),
        "reference_padded": dict(seed=2, pad_vocab_to=128), "reference": dict(seed=2),
        "student": dict(seed=3, layers=1), "student_padded": dict(seed=3, layers=1, pad_vocab_to=128),
    }
    return {name: make_real_shaped_model(root / name, **kwargs) for name, kwargs in build.items()}


@pytest.fixture(scope="module")
def tokenizer(real):
    return AutoTokenizer.from_pretrained(real["teacher"])


@pytest.fixture(scope="module")
def padded_teacher(real):
    """A padded teacher whose reference differs from it in padding (it starts: same tokenizer)."""
    return LocalTeacher.from_paths(str(real["teacher_padded"]), str(real["reference"]), beta=0.5)


def _sequences(tokenizer) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "sort red cat dog"}],
                                           add_generation_prompt=True, return_dict=False)
    answers = ["cat dog red thanks", "red cat dog bye"]
    sequences = [torch.tensor(prompt + tokenizer(a)["input_ids"]) for a in answers]
    return sequences, [(len(prompt) - 1, len(s) - 1) for s in sequences]


def _dense_logp(path: Path, sequences, ranges) -> torch.Tensor:
    """Plain transformers: fp32 log-softmax over every row of the model's logits, scored rows only."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [model(input_ids=s[None]).logits[0, a:b].float().log_softmax(-1) for s, (a, b) in zip(sequences, ranges)]
    return torch.cat(rows)  # (P, V_model)


def _check_support(answer, dense: torch.Tensor, shared: int) -> None:
    """Values exact at the returned ids, ids on the shared range, tail = 1 - sum over them."""
    valid = answer.indices >= 0
    assert bool(valid.any(-1).all())
    assert int(answer.indices.max()) < shared, "a padding row was returned as a support id"
    expected = dense.gather(-1, answer.indices.clamp(min=0)).masked_fill(~valid, 0.0)
    torch.testing.assert_close(answer.values, expected, atol=1e-5, rtol=1e-5)


def test_the_real_shaped_checkpoint_has_a_padded_vocabulary_and_a_chat_template(real, tokenizer):
    rows = AutoModelForCausalLM.from_pretrained(real["teacher_padded"]).get_output_embeddings().weight.shape[0]
    assert rows % 128 == 0 and rows >= len(tokenizer) + 64
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_end|>" in text


@pytest.mark.parametrize("support", [
    SupportSpec("topk", k=16), SupportSpec("indices", k=4), SupportSpec("sampled", n=64, seed=3),
    SupportSpec("dense"),
], ids=lambda s: s.kind)
def test_padded_teacher_signals_on_the_shared_range_are_exact(real, tokenizer, padded_teacher, support):
    sequences, ranges = _sequences(tokenizer)
    shared = len(tokenizer)
    info = padded_teacher.info().model
    assert (info.tokenizer_size, info.shared_vocab) == (shared, shared) and info.vocab_size > shared
    dpo = _dense_logp(real["teacher_padded"], sequences, ranges)  # (P, 640)
    ref = _dense_logp(real["reference"], sequences, ranges)  # (P, 523)
    positions = dpo.shape[0]
    if support.kind == "indices":  # the caller's ids: the last real id and a few others, every row
        support = SupportSpec("indices", k=4, indices=torch.tensor([[0, 5, shared - 1]] * positions))
    answer = padded_teacher.score(sequences, ranges, signal="advantage", support=support, include_logprobs=True)
    if support.kind == "dense":
        assert answer.values.shape == (positions, shared)
        torch.testing.assert_close(answer.extras["logprobs"], dpo[:, :shared], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(answer.values, 0.5 * (dpo[:, :shared] - ref), atol=1e-5, rtol=1e-5)
        return
    logprobs = type(answer)(**{**answer.__dict__, "values": answer.extras["logprobs"]})
    _check_support(logprobs, dpo, shared)
    reference = type(answer)(**{**answer.__dict__, "values": answer.extras["reference_logprobs"]})
    _check_support(reference, ref, shared)
    if support.kind == "sampled":
        return  # no tail: importance weights instead
    # The tail is 1 - sum over the returned ids, so the teacher's padding mass is in it.
    kept = torch.zeros_like(dpo, dtype=torch.bool).scatter_(-1, answer.indices.clamp(min=0), answer.indices >= 0)
    tail = dpo.masked_fill(kept, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(answer.extras["tail_logprobs"], tail, atol=1e-5, rtol=1e-5)
    assert float(dpo[:, shared:].logsumexp(-1).exp().min()) > 0  # the padding rows do hold mass


@pytest.fixture(scope="module")
def servers(tmp_path_factory, real):
    """A: padded teacher, unpadded reference; B: unpadded teacher, padded reference (in process)."""
    started = []
    try:
        for teacher, reference in (("teacher_padded", "reference"), ("teacher", "reference_padded")):
            with children_unmeasured():  # their code is measured in the suite's other servers
                started.append(start_service(tmp_path_factory, [
                    "--role", "teacher", "--model", str(real[teacher]), "--reference", str(real[reference]),
                    "--beta", "0.5", "--device", "cpu",
                ], env=SERVER_ENV))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.mark.slow
def test_both_transports_answer_on_the_shared_range(servers, tokenizer, padded_teacher):
    sequences, ranges = _sequences(tokenizer)
    shared = len(tokenizer)
    expected = padded_teacher.score(sequences, ranges, signal="advantage", support=SupportSpec("topk", k=8))
    padded = servers[0]
    with TeacherClient(padded.endpoint) as client:
        info = client.info().model
        assert (info.tokenizer_size, info.shared_vocab, info.vocab_size) == (shared, shared, 640)
        answer = client.score(sequences, ranges, signal="advantage", support=SupportSpec("topk", k=8))
        dense = client.score(sequences, ranges, signal="logprobs", support=SupportSpec("dense"))
    assert torch.equal(answer.indices, expected.indices) and int(answer.indices.max()) < shared
    torch.testing.assert_close(answer.values, expected.values, atol=1e-5, rtol=1e-5)
    assert dense.values.shape[-1] == shared
    body = {"sequences": [s.tolist() for s in sequences], "ranges": ranges, "signal": "advantage",
            "support": {"kind": "topk", "k": 8}}
    request = Request(f"http://127.0.0.1:{padded.http_port}/v1/score", json.dumps(body).encode(),
                      {"content-type": "application/json"})
    http = json.loads(urlopen(request).read())
    assert torch.equal(torch.tensor(http["indices"]), expected.indices)
    torch.testing.assert_close(torch.tensor(http["values"]), expected.values, atol=1e-5, rtol=1e-5)
    assert all(math.isfinite(t) for t in http["tail"])


@pytest.mark.slow
@pytest.mark.parametrize("student, server", [("student", 0), ("student_padded", 1)],
                         ids=["padded_teacher_plain_student", "plain_teacher_padded_student"])
@pytest.mark.parametrize("method, extra", [("dckd", {}), ("adpa", {"support": "indices", "student_k": 4})])
def test_dckd_and_adpa_train_across_padding(tmp_path, real, servers, student, server, method, extra):
    from adpa.training.run import run_distill

    records_path = tmp_path / "prefs.jsonl"
    records_path.write_text("\n".join(json.dumps(r) for r in make_records(8)))
    trainer = run_distill(str(real[student]), config(tmp_path / "out", method, max_steps=3, teacher=servers[server].endpoint,
                                                     **extra), load_records(str(records_path)))
    assert len(losses_of(trainer)) == 3 and all(math.isfinite(x) for x in losses_of(trainer))


def _one_line_refusal(proc: subprocess.CompletedProcess, *hashes: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "tokenizer" in line and "share" in line or "same tokenizer" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert all(h in lines[0] for h in hashes), lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_different_tokenizer_is_refused_in_one_line_with_exit_code_2(tmp_path, real, servers, teacher_path):
    env = {**os.environ, **SERVER_ENV}
    ours = LocalTeacher.from_paths(str(real["teacher"]), str(real["reference"])).info().model.tokenizer_hash
    theirs = LocalTeacher.from_paths(str(teacher_path), str(teacher_path)).info().model.tokenizer_hash
    serve = subprocess.run(
        [sys.executable, "-m", "adpa.cli", "serve", "--role", "teacher", "--model", str(real["teacher_padded"]),
         "--reference", str(teacher_path), "--device", "cpu", "--port", "0", "--http-port", "0"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    line = _one_line_refusal(serve, ours, theirs)
    assert "640" in line and "523 tokens" in line and "do not share a tokenizer" in line
    records = tmp_path / "prefs.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in make_records(4)))
    train = subprocess.run(
        [sys.executable, "-m", "adpa.cli", "train", "dckd", "--model", str(teacher_path), "--dataset", str(records),
         "--teacher", servers[0].endpoint, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
         "--report_to", "none", "--max_steps", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    _one_line_refusal(train, ours, theirs)


def test_served_model_name_in_answers_info_and_metrics(real, tokenizer):
    from fastapi.testclient import TestClient

    from adpa.protocol import ScoreQuery
    from adpa.services.config import ServeConfig
    from adpa.services.factory import build_service
    from adpa.services.frontend import Frontend
    from adpa.services.http.app import create_app

    config = ServeConfig(role="teacher", model=str(real["teacher_padded"]), reference=str(real["reference"]),
                         device="cpu", served_model_name="qwen-mini-dpo", reference_served_model_name="qwen-mini-sft")
    frontend = Frontend(build_service(config))
    sequences, ranges = _sequences(tokenizer)
    result = frontend.score(ScoreQuery(sequences, ranges, "advantage", SupportSpec("topk", k=4)))
    assert (result.model.model_name, result.reference.model_name) == ("qwen-mini-dpo", "qwen-mini-sft")
    http = TestClient(create_app(frontend, config))
    info = http.get("/v1/info").json()
    assert info["model"]["model_name"] == "qwen-mini-dpo" and info["reference"]["model_name"] == "qwen-mini-sft"
    metrics = http.get("/metrics").text
    assert 'adpa_model_info{' in metrics and 'model_name="qwen-mini-dpo"' in metrics
    assert str(real["teacher_padded"]) not in json.dumps(info) + metrics  # the path stays in the server's log


def test_device_map_cpu_and_eager_attention_give_the_sdpa_answer(real, tokenizer):
    from adpa.cli import build_parser
    from adpa.config import settings_from_args
    from adpa.services.config import ServeConfig
    from adpa.services.factory import load_engine

    argv = ["serve", "--role", "reference", "--model", str(real["teacher_padded"]), "--device-map", "cpu",
            "--max-memory", "cpu=4GiB", "--attn-implementation", "eager"]
    mapped = settings_from_args(ServeConfig, build_parser().parse_args(argv))
    assert (mapped.device_map_arg(), mapped.max_memory_arg()) == ("cpu", {"cpu": "4GiB"})
    plain = ServeConfig(role="reference", model=str(real["teacher_padded"]), device="cpu")
    engines = [load_engine(c, c.model) for c in (plain, mapped)]
    assert engines[1].model.config._attn_implementation == "eager"
    assert engines[1].device.type == "cpu"
    sequences, ranges = _sequences(tokenizer)
    sdpa, eager = (e.score(sequences, ranges, SupportSpec("dense")).logprobs for e in engines)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value, message", [("0=70GiB,gpu=1", "must be a GPU id"), ("{bad", "not valid JSON")])
def test_a_bad_max_memory_is_refused_with_its_value(value, message):
    from adpa.services.config import ServeConfig

    with pytest.raises(ValueError, match=message):
        ServeConfig(role="reference", model="m", device_map="auto", max_memory=value)
