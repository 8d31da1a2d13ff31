"""Model presets for the benchmarks, from tiny to Llama-3.1-8B-like (random weights), and the FLOPs
a scoring request costs on a model.

    from adpa.bench.presets import PRESETS, build_model, saved_model, model_shape, scoring_flops
    model = build_model(PRESETS["8b"], seed=1, device="cuda", dtype="bfloat16")   # in memory, no disk
    path = saved_model(PRESETS["1b"], Path("/tmp/models"), seed=1, device="cuda", dtype="bfloat16")

A preset is a Llama shape and a word-level tokenizer (adpa.tiny_model.build_tokenizer) whose
vocabulary is the built-in world's words, the tiny models' words and generated filler words up
to the preset's size (128,256 for the Llama-3 shapes), so every preset's tokenizer also reads the
demo's preference data. The weights are random: what these models are for is time, memory and
bytes, never the values of their answers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from adpa.demo.world import WORDS
from adpa.services.engine import resolve_device, resolve_dtype
from adpa.tiny_model import DEFAULT_WORDS, SPECIAL_TOKENS, build_tokenizer

LLAMA3_VOCAB = 128256


@dataclass(frozen=True)
class Preset:
    """A Llama shape with an untied output head."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    init_std: float  # tiny shapes use adpa.tiny_model's 0.2 (peaked random distributions); real shapes 0.02
    description: str
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def words(self) -> list[str]:
        """The tokenizer's words: the world's, the tiny models', then fillers `w<i>` up to `vocab`."""
        words = list(dict.fromkeys([*WORDS, *DEFAULT_WORDS]))
        fillers = self.vocab - len(SPECIAL_TOKENS) - len(words)
        if fillers < 0:
            raise ValueError(f"preset {self.name}: vocab {self.vocab} is smaller than the built-in words "
                             f"({len(words) + len(SPECIAL_TOKENS)})")
        return words + [f"w{i}" for i in range(fillers)]

    def tokenizer(self) -> PreTrainedTokenizerFast:
        tokenizer = build_tokenizer(self.words())
        assert len(tokenizer) == self.vocab, (len(tokenizer), self.vocab)
        return tokenizer

    def config(self) -> LlamaConfig:
        specials = {token: i for i, token in enumerate(SPECIAL_TOKENS)}  # build_tokenizer's ids
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_seq_len, initializer_range=self.init_std, tie_word_embeddings=False,
            rope_theta=500000.0, bos_token_id=specials["<s>"], eos_token_id=specials["</s>"],
            pad_token_id=specials["<pad>"],
        )

    def parameters(self) -> dict[str, int]:
        """Parameter counts from the shape (tests check them against an instantiated model)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden + 3 * self.hidden * self.intermediate
        body = self.layers * per_layer
        norms = (2 * self.layers + 1) * self.hidden
        embedding = head = self.vocab * self.hidden
        return {"total": body + norms + embedding + head, "body_matmul": body, "norms": norms,
                "embedding": embedding, "head": head}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 2, 64, 4, 2, 128, 256, 0.2, "CPU smoke tests: 2 layers, d=64, V=256"),
    Preset("tiny-128k", 2, 64, 4, 2, 128, LLAMA3_VOCAB, 0.2,
           "a tiny body with Llama 3's vocabulary (128,256): wire and memory, which scale with V"),
    Preset("1b", 16, 2048, 32, 8, 8192, LLAMA3_VOCAB, 0.02,
           "Llama-3.2-1B-like: 16 layers, d=2048, 32 heads, 8 kv heads, MLP 8192, untied head (1.50B)"),
    Preset("3b", 28, 3072, 24, 8, 8192, LLAMA3_VOCAB, 0.02,
           "Llama-3.2-3B-like: 28 layers, d=3072, 24 heads, 8 kv heads, MLP 8192, untied head (3.61B)"),
    Preset("8b", 32, 4096, 32, 8, 14336, LLAMA3_VOCAB, 0.02,
           "Llama-3.1-8B-like: 32 layers, d=4096, 32 heads, 8 kv heads, MLP 14336, untied head (8.03B)"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """As `adpa serve` resolves them: 'auto' device is cuda when there is one, 'auto' dtype bf16 on a GPU."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def build_model(preset: Preset, *, seed: int, device: str = "cpu", dtype: str = "float32") -> PreTrainedModel:
    """A random-init model built directly on `device` in `dtype` (an 8B shape initialises in
    seconds on a GPU, where building it on the CPU and moving it would take minutes)."""
    dev, torch_dtype = resolve(device, dtype)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(preset.config(), dtype=torch_dtype)
    return model.eval()


def saved_model(preset: Preset, folder: str | Path, *, seed: int, device: str = "cpu", dtype: str = "float32") -> Path:
    """`build_model` saved with save_pretrained (with its tokenizer) under `folder`, for `adpa serve`;
    a folder saved before with the same preset, seed and dtype is reused as it is."""
    _, torch_dtype = resolve(device, dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    out = Path(folder) / f"{preset.name}-seed{seed}-{dtype_name}"
    marker = out / "adpa_preset.json"
    want = {"preset": dataclasses.asdict(preset), "seed": seed, "dtype": dtype_name, "format": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out
    model = build_model(preset, seed=seed, device=device, dtype=dtype_name)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    preset.tokenizer().save_pretrained(out)
    marker.write_text(json.dumps(want, indent=2) + "\n")  # last: a half-written folder is rebuilt
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def model_shape(model: PreTrainedModel) -> dict:
    """What the FLOP count needs, read off a loaded causal LM."""
    config = model.config
    decoder = model.get_decoder()
    body = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", heads), "head_dim": head_dim,
        "intermediate": getattr(config, "intermediate_size", None), "vocab": head.shape[0],
        "params_total": sum(p.numel() for p in model.parameters()), "params_body_matmul": body,
        "params_head": head.numel(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


FLOPS_FORMULA = ("2 * N_body * T + 2 * layers * heads * head_dim * sum_seq L(L+1) + 2 * hidden * V * P; "
                 "N_body = weights of the body's matrix products (every nn.Linear of the decoder: attention "
                 "projections and MLP; no embedding, no norms, no output head), T = tokens forwarded, "
                 "L = each sequence's length (causal pairs only), P = scored positions (the head runs there only)")


def scoring_flops(shape: dict, lengths: list[int], scored: int, *, forwarded: int | None = None) -> dict:
    """FLOPs of one model's forward in the scoring engine, counted as matrix work only:

        FLOPs = 2 * N_body * T                                       (the body's matrix products)
              + 2 * layers * heads * head_dim * sum_seq L (L + 1)    (attention's own: q.k and p.v)
              + 2 * hidden * V * P                                   (the output head, scored rows only)

    - N_body: the weights of every nn.Linear in the decoder (q, k, v, o projections and the MLP);
      the embedding is a lookup, the norms' gains are elementwise (a few thousand of billions);
    - T: tokens the body forwards, `forwarded` (default sum(lengths): no padding, no shared prefix);
    - attention: per layer, each of the two products costs 2 * heads * head_dim FLOPs per causal
      (query, key) pair, and a sequence of length L has L (L + 1) / 2 of them; kernels that skip the
      masked half do this much work (counting the full L^2 square, as some MFU formulas do, would
      add up to twice this term);
    - head: the engine runs the output projection on the P scored rows only, never on all T.
    Not counted: norms, rotary embeddings, softmaxes, the fp32 log-softmax and the support's top-k.
    """
    tokens = sum(lengths) if forwarded is None else forwarded
    body = 2 * shape["params_body_matmul"] * tokens
    attention = 2 * shape["layers"] * shape["heads"] * shape["head_dim"] * sum(n * (n + 1) for n in lengths)
    head = 2 * shape["hidden"] * shape["vocab"] * scored
    return {"body": body, "attention": attention, "head": head, "total": body + attention + head,
            "tokens": tokens, "scored": scored}


def describe() -> str:
    return "\n".join(f"  {p.name:10} {p.description}" for p in PRESETS.values())
