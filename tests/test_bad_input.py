"""Bad input through the real gRPC (and HTTP) servers, with raw stubs.

The Python client never builds malformed requests, so these tests start from a valid
`adpa.v1.ScoreRequest` (`codec.query_to_pb`) and corrupt one field at a time: token ids
outside the vocabulary, empty or over-long sequences, broken score ranges and lengths,
out-of-range support parameters, unknown enum values and tensor datatypes, raw bytes that
don't match their shape, signals the role can't serve, limits on positions and message size,
and bearer-token auth.

Each refusal must carry the exact status code and a readable message that names the problem
without leaking a Python traceback; after each one a valid request must still get the same
answer it got before any bad input was sent, proving the server keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpa import codec
from adpa.protocol import ScoreQuery, SupportSpec
from adpa.v1 import scoring_pb2 as pb
from adpa.v1 import scoring_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

TIMEOUT_S = 30.0
TOKEN = "s3cret-token"
MAX_SEQ_LEN = 256  # of the tiny models
MAX_K, MAX_SAMPLES, MAX_POSITIONS, MAX_MESSAGE_BYTES = 32, 4096, 512, 1 << 20  # teacher_server's flags

# A valid batch: two sequences, 5 + 3 = 8 scored positions.
SEQUENCES = [torch.tensor([5, 37, 7, 8, 9, 10]), torch.tensor([11, 12, 13, 14])]
RANGES = [(0, 5), (1, 4)]
POSITIONS = 8
TOPK = SupportSpec("topk", k=4)

Codes = grpc.StatusCode


# -- building requests ----------------------------------------------------------------------------


def request(
    sequences: list[torch.Tensor] = SEQUENCES,
    ranges: list[tuple[int, int]] = RANGES,
    signal: str = "logprobs",
    support: SupportSpec = TOPK,
    **fields,
) -> pb.ScoreRequest:
    """A ScoreRequest as the client would build it (nothing checked on the way)."""
    query = ScoreQuery(sequences=list(sequences), ranges=list(ranges), signal=signal, support=support, **fields)
    return codec.query_to_pb(query)


def tensor(values, datatype: str = "INT32", shape: list[int] | None = None) -> pb.Tensor:
    """A wire tensor of `values`, optionally lying about its shape."""
    msg = codec.encode(torch.tensor(values), datatype)
    if shape is not None:
        del msg.shape[:]
        msg.shape.extend(shape)
    return msg


def replaced(msg: pb.ScoreRequest, **fields) -> pb.ScoreRequest:
    """A copy of `msg` with top-level fields (or support.<name> via support_<name>) replaced."""
    out = pb.ScoreRequest()
    out.CopyFrom(msg)
    for name, value in fields.items():
        target, name = (out.support, name.removeprefix("support_")) if name.startswith("support_") else (out, name)
        if isinstance(value, pb.Tensor):
            getattr(target, name).CopyFrom(value)
        else:
            setattr(target, name, value)
    return out


def truncated(t: pb.Tensor, nbytes: int = 1) -> pb.Tensor:
    return pb.Tensor(datatype=t.datatype, shape=list(t.shape), raw=t.raw[:-nbytes])


def with_token(token_id: int) -> pb.ScoreRequest:
    return request([torch.tensor([5, token_id, 7])], [(0, 3)])


# -- talking to a server --------------------------------------------------------------------------


@dataclass
class Scorer:
    """A raw stub on one server, and the answer a known-good request got before any bad input."""

    stub: pb_grpc.ScorerStub
    metadata: tuple = ()
    probe: pb.ScoreRequest | None = None
    expected: pb.ScoreResponse | None = None

    @property
    def vocab(self) -> int:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT_S, metadata=self.metadata).model.vocab_size

    def score(self, msg: pb.ScoreRequest, metadata: tuple | None = None) -> pb.ScoreResponse:
        return self.stub.Score(msg, timeout=TIMEOUT_S, metadata=self.metadata if metadata is None else metadata)

    def assert_serving(self) -> None:
        """The known-good request still gets exactly the answer it got at the start."""
        got, want = codec.result_from_pb(self.score(self.probe)), codec.result_from_pb(self.expected)
        for name in ("signal", "support", "model", "reference"):
            assert getattr(got, name) == getattr(want, name), name
        for name in ("indices", "values", "tail", "weights"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert got.extras.keys() == want.extras.keys()
        assert all(torch.equal(got.extras[k], want.extras[k]) for k in got.extras)

    def assert_refused(
        self, msg: pb.ScoreRequest, code: grpc.StatusCode, *needles: str, metadata: tuple | None = None
    ) -> str:
        """`msg` is refused with `code` and a readable message holding every needle; then still serving."""
        with pytest.raises(grpc.RpcError) as info:
            self.score(msg, metadata)
        err = info.value
        details = err.details() or ""
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {details}"
        assert_readable(details, *needles)
        self.assert_serving()
        return details


def assert_readable(details: str, *needles: str) -> None:
    assert details.strip() and details.isprintable(), repr(details)
    assert "Traceback" not in details and 'File "' not in details, details
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"


def connect(server, probe: pb.ScoreRequest, metadata: tuple = ()):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        scorer = Scorer(pb_grpc.ScorerStub(channel), metadata, probe)
        scorer.expected = scorer.score(probe)
        yield scorer


@pytest.fixture(scope="module")
def teacher(teacher_server):
    """The teacher (remote reference, tight limits); its probe asks for advantages, so both models run."""
    yield from connect(teacher_server, request(signal="advantage", include_logprobs=True))


@pytest.fixture(scope="module")
def reference(reference_server):
    yield from connect(reference_server, request())


@pytest.fixture(scope="module")
def authed(auth_server):
    yield from connect(auth_server, request(), metadata=(("authorization", f"Bearer {TOKEN}"),))


# -- the request's content: ids, sequences, ranges, lengths ---------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    [
        pytest.param(lambda vocab: -1, id="negative"),
        pytest.param(lambda vocab: -(2**31), id="int32-min"),
        pytest.param(lambda vocab: vocab, id="vocab-size"),
        pytest.param(lambda vocab: 2**31 - 1, id="int32-max"),
    ],
)
def test_token_id_outside_vocabulary(teacher, bad_id):
    vocab = teacher.vocab
    token_id = bad_id(vocab)
    teacher.assert_refused(
        with_token(token_id), Codes.INVALID_ARGUMENT, f"token id {token_id}", f"outside the vocabulary [0, {vocab})"
    )


def test_token_id_outside_vocabulary_as_int64(teacher):
    msg = replaced(with_token(5), input_ids=tensor([5, 2**40, 7], "INT64"))
    teacher.assert_refused(msg, Codes.INVALID_ARGUMENT, f"token id {2**40}")


def test_empty_sequence(teacher):
    msg = request([SEQUENCES[0], torch.zeros(0, dtype=torch.long)], [(0, 5), (0, 1)])
    teacher.assert_refused(msg, Codes.INVALID_ARGUMENT, "sequence 1 is empty")


def test_no_sequences(teacher):
    teacher.assert_refused(request([], []), Codes.INVALID_ARGUMENT, "no sequences")


@pytest.mark.parametrize("length", [MAX_SEQ_LEN + 1, 4 * MAX_SEQ_LEN])
def test_sequence_over_max_seq_len(teacher, length):
    msg = request([SEQUENCES[0], torch.full((length,), 9)], [(0, 5), (0, 1)])
    teacher.assert_refused(
        msg, Codes.OUT_OF_RANGE, f"sequence 1 has {length} tokens", f"max_seq_len {MAX_SEQ_LEN}"
    )


@pytest.mark.parametrize(
    "bad_range",
    [
        pytest.param((0, 7), id="end-past-length"),
        pytest.param((-1, 3), id="negative-start"),
        pytest.param((3, 3), id="empty"),
        pytest.param((4, 2), id="reversed"),
        pytest.param((6, 7), id="start-at-length"),
    ],
)
def test_score_range_outside_sequence(teacher, bad_range):
    start, end = bad_range
    msg = request(ranges=[bad_range, RANGES[1]])
    teacher.assert_refused(
        msg, Codes.OUT_OF_RANGE, f"score range [{start}, {end}) of sequence 0", "0 <= start < end <= 6"
    )


@pytest.mark.parametrize(
    "ranges, needle",
    [
        pytest.param(tensor([[0, 5, 0], [1, 4, 0]]), "got [2, 3]", id="three-columns"),
        pytest.param(tensor([[0, 5]]), "got [1, 2]", id="one-row-for-two-sequences"),
        pytest.param(tensor([0, 5, 1, 4]), "score_ranges: expected 2 dimensions", id="flat"),
        pytest.param(pb.Tensor(), "score_ranges: datatype '<empty>'", id="missing"),
    ],
)
def test_score_ranges_of_wrong_shape(teacher, ranges, needle):
    teacher.assert_refused(replaced(request(), score_ranges=ranges), Codes.INVALID_ARGUMENT, needle)


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([6, 3], id="short"),
        pytest.param([6, 5], id="long"),
        pytest.param([10], id="one-sequence"),  # sums right, but no longer matches score_ranges
        pytest.param([12, -2], id="negative"),
    ],
)
def test_lengths_not_matching_input_ids(teacher, lengths):
    msg = replaced(request(), lengths=tensor(lengths))
    needle = "score_ranges must have shape [1, 2]" if sum(lengths) == 10 and len(lengths) == 1 else "len(input_ids)=10"
    teacher.assert_refused(msg, Codes.INVALID_ARGUMENT, needle)


# -- the support ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "support, needles",
    [
        pytest.param(SupportSpec("topk", k=0), ["k=0", f"1 <= k <= {MAX_K}"], id="topk-k0"),
        pytest.param(SupportSpec("topk", k=MAX_K + 1), [f"k={MAX_K + 1}"], id="topk-k-over-max"),
        pytest.param(SupportSpec("topk", k=-3), ["k=-3"], id="topk-k-negative"),
        pytest.param(SupportSpec("sampled", n=0), ["n=0", f"1 <= n <= {MAX_SAMPLES}"], id="sampled-n0"),
        pytest.param(SupportSpec("sampled", n=MAX_SAMPLES + 1), [f"n={MAX_SAMPLES + 1}"], id="sampled-n-over-max"),
        pytest.param(SupportSpec("sampled", n=4, temperature=-1.0), ["temperature", "-1"], id="sampled-negative-t"),
        pytest.param(SupportSpec("sampled", n=4, temperature=float("nan")), ["temperature", "nan"], id="sampled-nan-t"),
        # Issue 11 finding 1: finite and > 0 on the wire, but 1/T leaves fp32 (NaN draws, status OK before).
        pytest.param(SupportSpec("sampled", n=4, temperature=1e-45), ["temperature", ">= 0.01"], id="sampled-denormal-t"),
        pytest.param(SupportSpec("sampled", n=4, temperature=1e-3), ["temperature", ">= 0.01"], id="sampled-tiny-t"),
        pytest.param(SupportSpec("indices", k=MAX_K + 1, indices=torch.zeros(POSITIONS, 1)), [f"k={MAX_K + 1}"],
                     id="indices-k-over-max"),
        pytest.param(SupportSpec("indices", k=2), [f"shape [{POSITIONS}, m]", "got None"], id="indices-missing"),
        pytest.param(SupportSpec("indices", k=2, indices=torch.zeros(POSITIONS - 1, 2)),
                     [f"shape [{POSITIONS}, m]", f"got [{POSITIONS - 1}, 2]"], id="indices-too-few-rows"),
        pytest.param(SupportSpec("indices", k=2, indices=torch.zeros(POSITIONS + 1, 2)),
                     [f"got [{POSITIONS + 1}, 2]"], id="indices-too-many-rows"),
        pytest.param(SupportSpec("indices", k=0, indices=torch.zeros(POSITIONS, 0)), ["at least one index"],
                     id="indices-k0-no-columns"),
        pytest.param(SupportSpec("indices", k=2, indices=torch.zeros(POSITIONS, 1025)),
                     ["1025 ids + k=2", "limit 1024"], id="indices-too-many-columns"),
    ],
)
def test_support_parameters_out_of_range(teacher, support, needles):
    teacher.assert_refused(request(support=support), Codes.INVALID_ARGUMENT, *needles)


@pytest.mark.parametrize("bad_index", [lambda vocab: vocab, lambda vocab: -2], ids=["vocab-size", "below-pad"])
def test_indices_outside_vocabulary(teacher, bad_index):
    vocab = teacher.vocab
    indices = torch.full((POSITIONS, 2), 3)
    indices[5, 1] = bad_index(vocab)
    msg = request(support=SupportSpec("indices", k=2, indices=indices))
    teacher.assert_refused(msg, Codes.INVALID_ARGUMENT, "support.indices", f"[0, {vocab})")


# -- enums, datatypes and raw bytes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, needles",
    [
        pytest.param({"signal": 7}, ["signal", "enum value 7"], id="signal-7"),
        pytest.param({"signal": pb.SIGNAL_UNSPECIFIED}, ["signal", "enum value 0"], id="signal-unspecified"),
        pytest.param({"support_kind": 9}, ["support.kind", "enum value 9"], id="support-kind-9"),
        pytest.param({"support_kind": pb.SUPPORT_UNSPECIFIED}, ["support.kind", "enum value 0"], id="support-unset"),
        pytest.param({"value_dtype": 5}, ["value_dtype", "enum value 5"], id="value-dtype-5"),
    ],
)
def test_unknown_enum_values(teacher, fields, needles):
    teacher.assert_refused(replaced(request(), **fields), Codes.INVALID_ARGUMENT, *needles)


def _ids() -> pb.Tensor:
    return request().input_ids


@pytest.mark.parametrize(
    "fields, needles",
    [
        pytest.param({"input_ids": pb.Tensor(datatype="FP8", shape=[10], raw=bytes(10))}, ["input_ids", "'FP8'"],
                     id="input-ids-fp8"),
        pytest.param({"input_ids": tensor([5.0] * 10, "FP32")}, ["input_ids", "'FP32'"], id="input-ids-float"),
        pytest.param({"input_ids": tensor([5] * 10, "BF16")}, ["input_ids", "'BF16'"], id="input-ids-bf16"),
        pytest.param({"lengths": tensor([6.0, 4.0], "FP16")}, ["lengths", "'FP16'"], id="lengths-float"),
        pytest.param({"lengths": pb.Tensor()}, ["lengths", "'<empty>'"], id="lengths-missing"),
        pytest.param({"input_ids": pb.Tensor(datatype="int32", shape=[10], raw=_ids().raw)}, ["'int32'"],
                     id="datatype-lowercase"),
        pytest.param({"input_ids": tensor([[5] * 5] * 2)}, ["input_ids", "expected 1 dimensions", "[2, 5]"],
                     id="input-ids-2d"),
    ],
)
def test_unknown_or_wrong_datatype(teacher, fields, needles):
    teacher.assert_refused(replaced(request(), **fields), Codes.INVALID_ARGUMENT, *needles)


@pytest.mark.parametrize(
    "fields, needles",
    [
        pytest.param({"input_ids": truncated(_ids())}, ["input_ids", "needs 40 bytes, got 39"], id="one-byte-short"),
        pytest.param({"input_ids": pb.Tensor(datatype="INT32", shape=[10], raw=_ids().raw + b"\0")},
                     ["input_ids", "needs 40 bytes, got 41"], id="one-byte-long"),
        pytest.param({"input_ids": pb.Tensor(datatype="INT64", shape=[10], raw=_ids().raw)},
                     ["input_ids", "INT64 needs 80 bytes, got 40"], id="int32-bytes-as-int64"),
        pytest.param({"input_ids": pb.Tensor(datatype="INT32", shape=[-10], raw=_ids().raw)},
                     ["input_ids", "negative dimension"], id="negative-dimension"),
        pytest.param({"input_ids": pb.Tensor(datatype="INT32", shape=[2**62], raw=_ids().raw)},
                     ["input_ids", f"needs {2**64} bytes"], id="huge-dimension"),
        pytest.param({"score_ranges": tensor([[0, 5], [1, 4]], shape=[2, 3])}, ["score_ranges", "needs 24 bytes"],
                     id="ranges-shape-lies"),
        pytest.param({"support_kind": pb.INDICES, "support_indices": tensor([[1, 2]] * 8, shape=[8, 3])},
                     ["support.indices", "needs 96 bytes, got 64"], id="indices-shape-lies"),
        # Issue 11 finding 2: zero bytes match a zero-size shape, but numpy can't make such an array
        # (INTERNAL before).
        pytest.param({"score_ranges": pb.Tensor(datatype="INT32", shape=[0, 2**62], raw=b"")},
                     ["score_ranges", "over 2147483647 elements"], id="empty-with-a-huge-dimension"),
        pytest.param({"support_kind": pb.INDICES,
                      "support_indices": pb.Tensor(datatype="INT32", shape=[2**63 - 1, 0], raw=b"")},
                     ["support.indices", "over 2147483647 elements"], id="indices-empty-with-a-huge-dimension"),
    ],
)
def test_raw_bytes_not_matching_shape(teacher, fields, needles):
    teacher.assert_refused(replaced(request(), **fields), Codes.INVALID_ARGUMENT, *needles)


# -- role and limits ------------------------------------------------------------------------------


def test_advantage_from_a_reference(reference):
    reference.assert_refused(request(signal="advantage"), Codes.INVALID_ARGUMENT, "ADVANTAGE", "reference")


def test_too_many_positions(teacher):
    sequences = [torch.full((200,), 9) for _ in range(3)]
    msg = request(sequences, [(0, 200)] * 3)
    teacher.assert_refused(msg, Codes.RESOURCE_EXHAUSTED, "600 scored positions", f"limit {MAX_POSITIONS}")


@pytest.mark.parametrize(
    "positions, n",
    [
        pytest.param(40, 4096, id="many-draws"),
        pytest.param(120, 1000, id="over-only-with-the-weights"),  # ids + values alone would fit: 960960 bytes
    ],
)
def test_answer_over_the_message_limit(teacher, positions, n):
    """Refused before any scoring, from the size the answer would take."""
    msg = request([torch.full((positions + 1,), 9)], [(0, positions)], support=SupportSpec("sampled", n=n))
    teacher.assert_refused(
        msg, Codes.RESOURCE_EXHAUSTED, "the answer would take about", f"message limit {MAX_MESSAGE_BYTES}"
    )


def test_request_over_the_message_limit(teacher):
    """grpc itself refuses a request larger than --max-message-mb, before any of our code runs."""
    ids = torch.full((300_000,), 9)
    msg = replaced(request(), input_ids=codec.encode(ids, "INT32"), lengths=tensor([300_000]),
                   score_ranges=tensor([[0, 1]]))
    assert msg.ByteSize() > MAX_MESSAGE_BYTES
    teacher.assert_refused(msg, Codes.RESOURCE_EXHAUSTED, str(MAX_MESSAGE_BYTES))


# -- auth -----------------------------------------------------------------------------------------


def bearer(*values: str) -> tuple:
    return tuple(("authorization", value) for value in values)


@pytest.mark.parametrize(
    "metadata, needle",
    [
        pytest.param((), "missing bearer token", id="no-token"),
        pytest.param(bearer("Bearer wrong-token"), "invalid bearer token", id="wrong-token"),
        pytest.param(bearer(f"bearer {TOKEN}"), "invalid bearer token", id="lowercase-bearer"),
        pytest.param(bearer(f"BEARER {TOKEN}"), "invalid bearer token", id="uppercase-bearer"),
        pytest.param(bearer(TOKEN), "invalid bearer token", id="no-prefix"),
        pytest.param(bearer(f"Token {TOKEN}"), "invalid bearer token", id="other-scheme"),
        pytest.param(bearer(f"Bearer  {TOKEN}"), "invalid bearer token", id="two-spaces"),
        pytest.param(bearer(f"Bearer {TOKEN}x"), "invalid bearer token", id="token-plus-a-char"),
        pytest.param(bearer(f"Bearer {TOKEN[:-1]}"), "invalid bearer token", id="token-prefix"),
        pytest.param((("x-authorization", f"Bearer {TOKEN}"),), "missing bearer token", id="wrong-key"),
    ],
)
def test_bad_token_is_unauthenticated(authed, metadata, needle):
    authed.assert_refused(request(), Codes.UNAUTHENTICATED, needle, metadata=metadata)
    with pytest.raises(grpc.RpcError) as info:
        authed.stub.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT_S, metadata=metadata)
    assert info.value.code() == Codes.UNAUTHENTICATED


def test_right_token_works_even_beside_a_wrong_one(authed):
    for metadata in (bearer(f"Bearer {TOKEN}"), bearer("Bearer wrong", f"Bearer {TOKEN}"),
                     bearer(f"Bearer {TOKEN}", "Bearer wrong")):
        assert authed.score(authed.probe, metadata) == authed.expected


def test_bad_input_with_the_right_token_is_still_judged_on_content(authed):
    authed.assert_refused(with_token(-1), Codes.INVALID_ARGUMENT, "token id -1")


def test_health_check_needs_no_token(auth_server, authed):
    with grpc.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "adpa.v1.Scorer"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    authed.assert_serving()


# -- the HTTP JSON route --------------------------------------------------------------------------


def test_http_score_refuses_an_out_of_vocabulary_id(teacher_server, teacher):
    url = f"http://127.0.0.1:{teacher_server.http_port}/v1/score"
    vocab = teacher.vocab
    bad = httpx.post(url, json={"sequences": [[5, vocab, 7]], "support": {"kind": "topk", "k": 3}}, timeout=TIMEOUT_S)
    assert bad.status_code == 400, bad.text
    body = bad.json()
    assert body["error"] == "INVALID_ARGUMENT"
    assert_readable(body["message"], f"token id {vocab}")

    good = httpx.post(url, json={"sequences": [[5, 37, 7]], "support": {"kind": "topk", "k": 3}}, timeout=TIMEOUT_S)
    assert good.status_code == 200, good.text
    answer = good.json()
    assert len(answer["indices"]) == 3 and all(len(row) == 3 for row in answer["indices"])
    teacher.assert_serving()


# -- regressions: bugs these probes once found ---------------------------------------------------


def test_lengths_that_overflow_int64_when_summed(teacher):
    """Four non-negative INT64 lengths whose sum wraps around 2**64 to exactly len(input_ids)."""
    lengths = [2**62, 2**62, 2**62, 2**62 + 10]
    msg = replaced(request(), lengths=tensor(lengths, "INT64"), score_ranges=tensor([[0, 1]] * 4))
    teacher.assert_refused(msg, Codes.INVALID_ARGUMENT, "lengths")


def test_sampled_advantage_up_to_the_announced_max_samples(teacher):
    """ModelInfo announces max_samples=4096; an ADVANTAGE request within it must be answered."""
    msg = request([SEQUENCES[0]], [(0, 1)], signal="advantage", support=SupportSpec("sampled", n=MAX_SAMPLES, seed=1))
    answer = codec.result_from_pb(teacher.score(msg))
    assert answer.indices.shape == (1, MAX_SAMPLES)
    teacher.assert_serving()


@pytest.mark.parametrize("signal", ["logprobs", "advantage"])
def test_indices_of_padding_only_with_k0(teacher, signal):
    """INDICES with k=0 and only -1 pads selects no token at all: as invalid as a zero-width tensor."""
    indices = torch.full((POSITIONS, 2), -1)
    msg = request(signal=signal, support=SupportSpec("indices", k=0, indices=indices))
    teacher.assert_refused(msg, Codes.INVALID_ARGUMENT, "index")


def test_sampled_with_a_temperature_that_is_zero_in_fp32_over_http(teacher_server, teacher):
    """Issue 11 finding 1 over HTTP: 1e-300 is a float64 > 0 but 0 in fp32 (NaN weights with 200 before)."""
    url = f"http://127.0.0.1:{teacher_server.http_port}/v1/score"
    body = {"sequences": [[5, 37, 7]], "support": {"kind": "sampled", "n": 4, "temperature": 1e-300}}
    answer = httpx.post(url, json=body, timeout=TIMEOUT_S)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "INVALID_ARGUMENT"
    assert_readable(answer.json()["message"], "temperature", ">= 0.01")
    teacher.assert_serving()


def test_unparsable_bytes_are_invalid_argument_without_a_logged_traceback(teacher_server, teacher):
    """Issue 11 finding 8: bytes that are no ScoreRequest were INTERNAL, with a traceback logged at ERROR."""
    log = teacher_server.log_path.read_text()
    with grpc.insecure_channel(f"127.0.0.1:{teacher_server.port}") as channel:
        raw = channel.unary_unary("/adpa.v1.Scorer/Score")  # bytes in, bytes out
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", bytes(range(256))):
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=TIMEOUT_S)
            assert info.value.code() == Codes.INVALID_ARGUMENT, info.value.details()
            assert_readable(info.value.details(), "could not be parsed as adpa.v1.ScoreRequest")
    new_lines = teacher_server.log_path.read_text()[len(log):]
    assert "Traceback" not in new_lines and " ERROR " not in new_lines, new_lines[-2000:]
    teacher.assert_serving()
