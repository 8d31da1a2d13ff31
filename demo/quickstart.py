"""`adpa quickstart`: a tiny teacher and reference, served and queried, in about 20 seconds.

Builds two tiny random models offline, starts `adpa serve --role reference` and
`adpa serve --role teacher --reference grpc://...` on free loopback ports, asks the teacher for
log-probs and advantages of a chat response with the Python client, prints them, and stops both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from adpa.client import TeacherClient
from adpa.services.launch import ServiceProcess
from adpa.protocol import SupportSpec
from adpa.tiny_model import make_tiny_model

logger = logging.getLogger(__name__)


def run_quickstart(workdir: str | Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = Path(workdir)
    teacher_dir, reference_dir = workdir / "teacher", workdir / "reference"
    for path, seed in ((reference_dir, 0), (teacher_dir, 1)):
        if not (path / "config.json").exists():
            make_tiny_model(path, seed=seed)
            logger.info("built tiny model %s", path)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    env = {"ADPA_TORCH_THREADS": "1"}
    started = time.perf_counter()
    with ServiceProcess(["--role", "reference", "--model", str(reference_dir)], env=env,
                        log_path=workdir / "reference.log") as reference:
        logger.info("reference serving on %s (log: %s)", reference.endpoint, workdir / "reference.log")
        with ServiceProcess(
            ["--role", "teacher", "--model", str(teacher_dir), "--reference", reference.endpoint, "--beta", "0.1"],
            env=env, log_path=workdir / "teacher.log",
        ) as teacher:
            logger.info("teacher serving on %s, HTTP on :%d (%.1fs to start both)",
                        teacher.endpoint, teacher.http_port, time.perf_counter() - started)
            with TeacherClient(teacher.endpoint) as client:
                info = client.check_compatible(tokenizer)
                logger.info("handshake: teacher %s, reference %s, tokenizer %s, beta %.2f",
                            info.model.model_hash, info.reference.model_hash, info.model.tokenizer_hash, info.beta)
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": "sort red blue cat"}], add_generation_prompt=True,
                    tokenize=True, return_dict=False,
                )
                response = tokenizer("blue cat red thanks", add_special_tokens=False)["input_ids"]
                ids = prompt + response + [tokenizer.eos_token_id]
                scored = (len(prompt) - 1, len(ids) - 1)  # the positions that predict the response
                answer = client.score([ids], [scored], signal="advantage", support=SupportSpec("topk", k=3),
                                      include_logprobs=True)
            _print_table(tokenizer, ids, scored, answer)
    logger.info("both services stopped")
    return 0


def _print_table(tokenizer, ids, scored, answer) -> None:
    print(f"\n{'next token':>12} | teacher top-3 with advantage beta*(log pi_dpo - log pi_ref)   | tail A")
    print("-" * 90)
    for row, pos in enumerate(range(*scored)):
        cells = [
            f"{tokenizer.convert_ids_to_tokens(int(i))}:{float(a):+.2f}"
            for i, a in zip(answer.indices[row], answer.values[row])
        ]
        actual = tokenizer.convert_ids_to_tokens(ids[pos + 1])
        print(f"{actual:>12} | {'  '.join(cells):<62} | {float(answer.tail[row]):+.3f}")
    p = torch.exp(answer.extras["logprobs"]).sum(-1)
    print(f"\nteacher mass on its top-3 per position: {', '.join(f'{float(x):.2f}' for x in p)}\n")
