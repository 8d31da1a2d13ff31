"""Fuzzing a teacher service: hypothesis-generated gRPC requests and raw bytes, HTTP bodies from the OpenAPI schema (schemathesis) and near-valid JSON; counts the cases tried and the failures.

    .venv/bin/python robustness/fuzz.py                              # 10,000 gRPC + 2,000 HTTP cases
    .venv/bin/python robustness/fuzz.py --grpc-cases 300 --http-cases 100 --out fuzz.json  # a quick run
    .venv/bin/python robustness/fuzz.py --endpoint grpc://127.0.0.1:50051 --http http://127.0.0.1:8080

Without --endpoint it builds the tiny models (adpa.tiny_model) and starts a reference and a teacher
with that remote reference (`adpa serve`, tight limits so that limits are met), and stops them at
the end. A case fails when the answer is not a proper status for its input: any gRPC code other
than OK, INVALID_ARGUMENT, OUT_OF_RANGE and RESOURCE_EXHAUSTED (INTERNAL, UNKNOWN, UNAVAILABLE...),
a message with a traceback or unprintable text, an OK answer that does not decode, has the wrong
number of rows or holds NaN; over HTTP a 5xx, a non-JSON error, or a 200 with NaN or missing
weights. After the run the server must still answer a known request byte-identically. JSON goes
to stdout (or --out), a table to stderr. tests/test_fuzz.py runs the same properties, briefly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from adpa import codec
from adpa.v1 import scoring_pb2 as pb

GRPC_OK_CODES = {"OK", "INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"}
HTTP_OK_STATUSES = {200, 400, 413, 422, 429}
# Limits of the teacher this script starts (and tests/conftest.py's teacher_server): small enough
# that generated requests meet them.
TEACHER_FLAGS = ["--beta", "0.5", "--max-k", "32", "--max-samples", "4096", "--max-positions", "512",
                 "--max-message-mb", "1"]
INT32_EDGES = [-(2**31), -1, 0, 1, 2, 3, 4, 5, 8, 31, 32, 33, 76, 77, 78, 255, 256, 257, 1024, 1025, 4096, 4097,
               65536, 2**31 - 1]
FLOAT_EDGES = [0.0, -0.0, 1.0, 0.5, 2.0, 0.01, 0.0099, 1e-45, 1e-38, 1e-30, 3.4e38, math.inf, -math.inf, math.nan,
               -1.0, 100.0]
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])


# -- gRPC cases -----------------------------------------------------------------------------------


def _ints32():
    return st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))


@st.composite
def _wild_tensor(draw) -> pb.Tensor:
    """Any tensor: datatypes right and wrong, shapes negative, empty or huge, bytes that may not fit."""
    datatype = draw(st.one_of(st.sampled_from(["INT32", "INT64", "FP32", "BF16", "FP16"]),
                              st.sampled_from(["", "int32", "FP8", "UINT8", "INT32 "]), st.text(max_size=6)))
    dims = st.one_of(st.integers(0, 8), st.sampled_from([-1, 2**31, 2**62, 2**63 - 1, -(2**63)]))
    shape = draw(st.lists(dims, max_size=3))
    if datatype in codec.DATATYPES and all(0 <= d <= 8 for d in shape) and draw(st.booleans()):
        raw = bytes(math.prod(shape) * codec.DATATYPES[datatype][1].itemsize)  # the right size, zeros
    else:
        raw = draw(st.binary(max_size=64))
    return pb.Tensor(datatype=datatype, shape=shape, raw=raw)


def _rarely(draw, one_in: int = 16) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def score_requests(draw, vocab: int = 77) -> pb.ScoreRequest:
    """Mostly well-formed requests near the limits, with a field now and then pushed past them (each
    way of breaking a request is rare, so that most cases reach the deeper checks and the model)."""
    valid_id = st.integers(0, vocab - 1)
    ids = st.one_of(valid_id, st.integers(-3, vocab + 3), st.sampled_from([-(2**31), 2**31 - 1])) \
        if _rarely(draw, 6) else valid_id
    big = _rarely(draw, 8)  # 3-4 long sequences scored in full: past max_positions (512 on the test teacher)
    count = draw(st.integers(3, 4)) if big else draw(st.integers(1, 4)) if not _rarely(draw, 20) else 0
    sequences = [draw(st.lists(ids, min_size=130 if big else 0 if _rarely(draw, 20) else 1,
                               max_size=256 if big else draw(st.sampled_from([8, 8, 40, 300]))))
                 for _ in range(count)]
    ranges = []
    for seq in sequences:
        n = len(seq)
        if big:
            ranges.append((0, n))
        elif n and not _rarely(draw, 12):
            start = draw(st.integers(0, n - 1))
            ranges.append((start, draw(st.integers(start + 1, n))))
        else:  # broken on purpose
            ranges.append((draw(st.integers(-2, n + 2)), draw(st.integers(-2, n + 3))))
    positions = sum(max(0, min(e, len(s)) - max(0, b)) for s, (b, e) in zip(sequences, ranges))
    kind = draw(st.sampled_from([0, 5, 99, -1])) if _rarely(draw, 20) else draw(st.sampled_from([1, 2, 3, 4]))
    small = st.integers(0, 40)
    support = pb.Support(kind=kind, k=draw(_ints32() if _rarely(draw, 8) else small),
                         n=draw(_ints32() if _rarely(draw, 8) else st.integers(1, 20)),
                         seed=draw(st.integers(0, 2**64 - 1)),
                         temperature=draw(st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32)))
                         if _rarely(draw, 4) else draw(st.sampled_from([0.0, 1.0, 0.5, 2.0])))
    if kind == 2 and not _rarely(draw, 10):
        rows = positions + (draw(st.sampled_from([-1, 1])) if _rarely(draw, 10) else 0)
        width = draw(st.integers(0, 4))
        cell = st.integers(-2, vocab + 1) if _rarely(draw, 6) else st.integers(-1, vocab - 1)
        cells = draw(st.lists(cell, min_size=max(rows, 0) * width, max_size=max(rows, 0) * width))
        support.indices.CopyFrom(pb.Tensor(datatype="INT32", shape=[max(rows, 0), width],
                                           raw=np.array(cells, "<i4").tobytes()))
    flat = [t for s in sequences for t in s]
    msg = pb.ScoreRequest(
        request_id=draw(st.text(max_size=12)),
        signal=draw(st.sampled_from([0, 3, -5, 1000])) if _rarely(draw, 20) else draw(st.sampled_from([1, 2])),
        support=support,
        input_ids=pb.Tensor(datatype=draw(st.sampled_from(["INT32", "INT64"])), shape=[len(flat)]),
        lengths=pb.Tensor(datatype="INT32", shape=[count], raw=np.array([len(s) for s in sequences], "<i4").tobytes()),
        score_ranges=pb.Tensor(datatype="INT32", shape=[count, 2], raw=np.array(ranges, "<i4").reshape(-1, 2).tobytes()),
        value_dtype=draw(st.sampled_from([4, -1])) if _rarely(draw, 20) else draw(st.sampled_from([0, 1, 2, 3])),
        include_logprobs=draw(st.booleans()),
    )
    msg.input_ids.raw = np.array(flat, "<i4" if msg.input_ids.datatype == "INT32" else "<i8").tobytes()
    if _rarely(draw, 10):  # one tensor replaced by anything at all
        name = draw(st.sampled_from(["input_ids", "lengths", "score_ranges", "support.indices"]))
        target = msg.support.indices if name == "support.indices" else getattr(msg, name)
        target.CopyFrom(draw(_wild_tensor()))
    return msg


@st.composite
def grpc_cases(draw, vocab: int = 77) -> tuple[str, bytes]:
    """(method, serialized request): structured requests, corrupted ones, and arbitrary bytes."""
    choice = draw(st.integers(0, 9))
    if choice < 6:
        return "Score", draw(score_requests(vocab)).SerializeToString()
    if choice < 8:  # a real request with bytes flipped, cut or inserted
        raw = bytearray(draw(score_requests(vocab)).SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            if not raw:
                break
            at = draw(st.integers(0, len(raw) - 1))
            action = draw(st.sampled_from(["flip", "cut", "insert"]))
            if action == "flip":
                raw[at] ^= draw(st.integers(1, 255))
            elif action == "cut":
                del raw[at:]
            else:
                raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        return "Score", bytes(raw)
    return draw(st.sampled_from(["Score", "ModelInfo"])), draw(st.binary(max_size=200))


def grpc_problem(method: str, request: bytes, outcome) -> str | None:
    """Why an answer to `request` is not a proper one (None when it is)."""
    if isinstance(outcome, grpc.RpcError):
        code, details = outcome.code().name, outcome.details() or ""
        if code not in GRPC_OK_CODES:
            return f"{code}: {details[:200]}"
        if not details.strip() or not details.isprintable() or "Traceback" in details or 'File "' in details:
            return f"{code} with an unreadable message: {details[:200]!r}"
        return None
    if method == "ModelInfo":
        pb.ModelInfoResponse.FromString(outcome)
        return None
    try:
        query = codec.query_from_pb(pb.ScoreRequest.FromString(request))
        answer = codec.result_from_pb(pb.ScoreResponse.FromString(outcome))
    except Exception as err:  # noqa: BLE001 - any failure here is the finding
        return f"OK, but the answer does not decode: {type(err).__name__}: {err}"
    rows = query.num_positions
    for name in ("indices", "values", "tail", "weights"):
        tensor = getattr(answer, name)
        if tensor is not None and tensor.shape[0] != rows:
            return f"OK, but {name} has {tensor.shape[0]} rows for {rows} positions"
    for name in ("values", "tail", "weights", *answer.extras):
        tensor = answer.extras[name] if name in answer.extras else getattr(answer, name)
        if tensor is not None and bool(tensor.isnan().any()):
            return f"OK, but {name} holds NaN"
    if answer.weights is not None and not bool(answer.weights.isfinite().all()):
        return "OK, but weights are not finite"
    return None


@dataclass
class Tally:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[dict] = field(default_factory=list)

    def record(self, kind: str, outcome: str, problem: str | None, case) -> None:
        self.cases += 1
        self.outcomes[f"{kind} {outcome}"] += 1
        if problem is not None:
            self.failures.append({"kind": kind, "problem": problem, "case": repr(case)[:400]})


def run_grpc(target: str, cases: int, vocab: int, *, metadata=(), fail_fast: bool = False,
             tally: Tally | None = None) -> Tally:
    """`cases` hypothesis-generated calls to `target` (host:port); with fail_fast an improper answer
    raises AssertionError (and hypothesis shrinks it), else it is counted."""
    tally = tally or Tally()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        methods = {name: channel.unary_unary(f"/adpa.v1.Scorer/{name}") for name in ("Score", "ModelInfo")}

        @settings(max_examples=cases, **SETTINGS)
        @given(case=grpc_cases(vocab))
        def one(case):
            method, request = case
            try:
                outcome = methods[method](request, timeout=60, metadata=metadata)
                name = "OK"
            except grpc.RpcError as err:
                outcome, name = err, err.code().name
            problem = grpc_problem(method, request, outcome)
            tally.record("grpc", name, problem, case)
            if fail_fast:
                assert problem is None, f"{problem}; case: {case!r}"[:2000]

        one()
    return tally


# -- HTTP cases -----------------------------------------------------------------------------------


@st.composite
def http_bodies(draw, vocab: int = 77):
    """Near-valid JSON bodies for POST /v1/score (the schema-driven cases come from schemathesis)."""
    valid_id = st.integers(0, vocab - 1)
    ids = st.one_of(valid_id, st.integers(-2, vocab + 2), st.sampled_from([2**63 - 1, -(2**63)])) \
        if _rarely(draw, 6) else valid_id
    sequences = draw(st.lists(st.lists(ids, min_size=0 if _rarely(draw, 10) else 1, max_size=30),
                              min_size=0 if _rarely(draw, 10) else 1, max_size=4))
    body = {"sequences": sequences}
    if _rarely(draw, 3):
        body["ranges"] = [[draw(st.integers(-1, len(s))), draw(st.integers(0, len(s) + 1))] for s in sequences]
    kind = draw(st.sampled_from(["TOPK", "nope", ""])) if _rarely(draw, 10) else \
        draw(st.sampled_from(["topk", "indices", "sampled", "dense"]))
    support = {"kind": kind, "k": draw(st.sampled_from(INT32_EDGES) if _rarely(draw, 8) else st.integers(1, 32))}
    positions = sum(len(s) for s in sequences)
    if kind == "sampled":
        support |= {"n": draw(st.integers(0, 64)), "seed": draw(st.integers(0, 2**64 - 1)),
                    "temperature": draw(st.sampled_from(FLOAT_EDGES)) if _rarely(draw, 4) else 1.0}
    if kind == "indices":
        rows = positions + (draw(st.sampled_from([-1, 1])) if _rarely(draw, 10) else 0)
        cell = st.integers(-2, vocab + 1) if _rarely(draw, 6) else st.integers(-1, vocab - 1)
        support["indices"] = draw(st.lists(st.lists(cell, min_size=1, max_size=4), min_size=max(rows, 0),
                                           max_size=max(rows, 0)))
    signal = draw(st.sampled_from(["x", "LOGPROBS"])) if _rarely(draw, 10) else \
        draw(st.sampled_from(["logprobs", "advantage"]))
    body |= {"support": support, "signal": signal, "include_logprobs": draw(st.booleans())}
    return json.dumps(body, allow_nan=True)  # NaN/Infinity literals on purpose


def http_problem(status: int, content_type: str, text: str) -> str | None:
    """Why an HTTP answer is not a proper one (None when it is)."""
    if status not in HTTP_OK_STATUSES:
        return f"HTTP {status}: {text[:200]}"
    if not content_type.startswith("application/json"):
        return f"HTTP {status} with content-type {content_type}: {text[:200]}"
    body = json.loads(text)
    if status != 200:
        message = body.get("message", "")
        if "Traceback" in message or not message:
            return f"HTTP {status} without a readable message: {text[:200]}"
        return None
    rows = len(body["values"])
    if body["weights"] is not None and any(w is None for row in body["weights"] for w in row):
        return "HTTP 200 with non-finite weights"
    if any(v is None for row in body["values"] for v in row):
        return "HTTP 200 with non-finite values"
    if body["indices"] is not None and len(body["indices"]) != rows:
        return "HTTP 200 with indices and values of different lengths"
    return None


def run_http(base_url: str, cases: int, vocab: int, *, headers=None, fail_fast: bool = False,
             tally: Tally | None = None) -> Tally:
    """About `cases` cases: a third near-valid bodies, two thirds from the OpenAPI schema (schemathesis,
    positive and negative); with fail_fast an improper answer raises AssertionError."""
    import schemathesis
    from schemathesis import GenerationMode

    tally = tally or Tally()
    with httpx.Client(base_url=base_url, timeout=60, headers=headers or {}) as http:

        @settings(max_examples=max(1, cases // 3), **SETTINGS)
        @given(body=http_bodies(vocab))
        def near_valid(body):
            response = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
            problem = http_problem(response.status_code, response.headers.get("content-type", ""), response.text)
            tally.record("http", str(response.status_code), problem, body)
            if fail_fast:
                assert problem is None, f"{problem}; body: {body!r}"[:2000]

        near_valid()
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers or {})
        score = next(r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/score")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=max(1, cases // 3), **SETTINGS)
            @given(case=score.as_strategy(generation_mode=mode))
            def from_schema(case):
                response = case.call(base_url=base_url, headers=headers or {})
                content_type = (response.headers.get("content-type") or [""])[0]
                problem = http_problem(response.status_code, content_type, response.text)
                tally.record("http", str(response.status_code), problem, case.body)
                if fail_fast:
                    assert problem is None, f"{problem}; body: {case.body!r}"[:2000]

            from_schema()
    return tally


# -- the known request, before and after ------------------------------------------------------------


def probe_request() -> pb.ScoreRequest:
    from adpa.protocol import ScoreQuery, SupportSpec
    import torch

    query = ScoreQuery(sequences=[torch.tensor([5, 37, 7, 8, 9, 10]), torch.tensor([11, 12, 13, 14])],
                       ranges=[(0, 5), (1, 4)], signal="advantage", support=SupportSpec("topk", k=4),
                       include_logprobs=True)
    return codec.query_to_pb(query)


def probe(target: str, metadata=()) -> bytes:
    with grpc.insecure_channel(target) as channel:
        return channel.unary_unary("/adpa.v1.Scorer/Score")(probe_request().SerializeToString(), timeout=60,
                                                            metadata=metadata)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grpc-cases", type=int, default=10_000)
    p.add_argument("--http-cases", type=int, default=2_000)
    p.add_argument("--endpoint", default=None, help="grpc://host:port of a teacher to fuzz (default: start one)")
    p.add_argument("--http", default=None, help="its HTTP base URL (default: the one started)")
    p.add_argument("--token", default=None, help="bearer token of that server")
    p.add_argument("--workdir", default=None, help="where the tiny models and server logs go (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    return p.parse_args(argv)


def start_servers(stack: ExitStack, workdir: Path) -> tuple[str, str]:
    from adpa.services.launch import ServiceProcess
    from adpa.tiny_model import make_tiny_model

    env = {"OMP_NUM_THREADS": "1", "ADPA_TORCH_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    teacher = make_tiny_model(workdir / "teacher", layers=2, hidden=64, seed=1)
    reference = make_tiny_model(workdir / "reference", layers=2, hidden=64, seed=2)
    ref = stack.enter_context(ServiceProcess(["--role", "reference", "--model", str(reference)], env=env,
                                             log_path=workdir / "reference.log", http=False))
    server = stack.enter_context(ServiceProcess(
        ["--role", "teacher", "--model", str(teacher), "--reference", ref.endpoint, *TEACHER_FLAGS], env=env,
        log_path=workdir / "teacher.log"))
    return f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.http_port}"


def main(argv=None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        if args.endpoint:
            target = args.endpoint.removeprefix("grpc://")
            base_url = args.http
        else:
            target, base_url = start_servers(stack, workdir)
        metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
        headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
        before = probe(target, metadata)
        started = time.perf_counter()
        grpc_tally = run_grpc(target, args.grpc_cases, 77, metadata=metadata)
        grpc_s = time.perf_counter() - started
        started = time.perf_counter()
        http_tally = run_http(base_url, args.http_cases, 77, headers=headers) if base_url else Tally()
        http_s = time.perf_counter() - started
        identical = probe(target, metadata) == before
    result = {
        "grpc": {"cases": grpc_tally.cases, "failures": len(grpc_tally.failures), "seconds": round(grpc_s, 1),
                 "outcomes": dict(grpc_tally.outcomes.most_common()), "first_failures": grpc_tally.failures[:20]},
        "http": {"cases": http_tally.cases, "failures": len(http_tally.failures), "seconds": round(http_s, 1),
                 "outcomes": dict(http_tally.outcomes.most_common()), "first_failures": http_tally.failures[:20]},
        "probe_identical_after": identical,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    rows = [("gRPC", grpc_tally, grpc_s), ("HTTP", http_tally, http_s)]
    print(f"{'side':6} {'cases':>7} {'failures':>9} {'seconds':>8}  outcomes", file=sys.stderr)
    for name, tally, seconds in rows:
        outcomes = ", ".join(f"{k.split(' ', 1)[1]} {v}" for k, v in tally.outcomes.most_common())
        print(f"{name:6} {tally.cases:7d} {len(tally.failures):9d} {seconds:8.1f}  {outcomes}", file=sys.stderr)
    print(f"known request answered byte-identically afterwards: {identical}", file=sys.stderr)
    return 0 if identical and not grpc_tally.failures and not http_tally.failures else 1


if __name__ == "__main__":
    sys.exit(main())
