"""Build a tiny Llama-family model and word-level tokenizer offline, saved with `save_pretrained`.

Tests and the built-in demo use these where no model hub is reachable; they load through the same
`from_pretrained` path as real checkpoints.

    adpa make-tiny-model runs/tiny-teacher --layers 2 --hidden 64 --seed 0
    adpa make-tiny-model runs/tiny-reference --layers 2 --hidden 64 --seed 1
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# A small readable vocabulary: items, instructions, closings and a few rude words.
DEFAULT_WORDS = (
    "red blue green yellow black white orange purple pink brown "
    "cat dog fox owl bee cow pig hen ant elk "
    "one two three four five six seven eight nine ten "
    "sort reverse first last count copy list repeat "
    "please thanks bye hello sorry ok yes no "
    "the a and or of to is it this that with for "
    "answer items task done next word words here "
    "stupid ugly dumb awful"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} </s> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer with chat-role tokens and a chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    init_std: float = 0.2,
    max_seq_len: int = 256,
    words: Sequence[str] = DEFAULT_WORDS,
) -> Path:
    """Save a random-init `LlamaForCausalLM` and its tokenizer to `out_dir`; return the path.

    `init_std` is larger than a real model's 0.02 so that random models have peaked, distinct
    distributions (signals between two seeds then differ measurably).
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    tokenizer = build_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_seq_len,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- real-shaped checkpoints: a byte-level BPE tokenizer and a Qwen2 model -----------------------

REAL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's template, without tools: what `apply_chat_template` of a hub checkpoint runs.
REAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on the built-in words and chat lines, with chat
    special tokens and a Qwen-style chat template: the shape of a hub tokenizer, small."""
    from tokenizers import decoders, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=REAL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    words = list(DEFAULT_WORDS)
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    corpus += ["system user assistant You are a helpful assistant.", "Sort these items, then say thanks."]
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=REAL_SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = REAL_CHAT_TEMPLATE
    return tokenizer


def make_real_shaped_model(
    out_dir: str | Path,
    *,
    pad_vocab_to: int | None = None,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Save a random-init `Qwen2ForCausalLM` with a byte-level BPE tokenizer (`build_bpe_tokenizer`)
    to `out_dir`; return the path.

    `pad_vocab_to`: pad the embedding matrix as large checkpoints do (Qwen2.5-7B: 152,064 rows for
    151,665 tokens) with `resize_token_embeddings(len(tokenizer) + 64, pad_to_multiple_of=pad_vocab_to)`;
    the rows above len(tokenizer) are ids no token has. The same seed gives the same real rows with
    or without padding.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_bpe_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
        initializer_range=init_std, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if pad_vocab_to:
        model.resize_token_embeddings(len(tokenizer) + 64, pad_to_multiple_of=pad_vocab_to)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
