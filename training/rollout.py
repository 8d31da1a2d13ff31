"""Student samples y_hat for ADPA: stop at EOS (kept and scored), nothing after it, and no special
token other than EOS inside a response. Also: the model to call `generate` on when the student is
wrapped for data-parallel or sharded training (`generation_model`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase


class PerRowGumbel(LogitsProcessor):
    """Sampling at `temperature` as `argmax_a(logits_a / T + g_a)`, g Gumbel noise (the Gumbel-max trick),
    with each row's noise drawn from its own generator seeded with `seeds[row]`.

    Run under greedy decoding it draws exactly from softmax(logits / T), and a row's sample depends only
    on its prompt, its seed and the model: not on which other prompts share its batch. That is what lets
    ranks sample their own shares of the records and still draw what one process would have.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, device: torch.device):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # One Exp(1) draw per vocabulary entry and row, from the row's own stream: -log(E) is Gumbel(0, 1).
        # In float64: a float32 draw is exactly 0 with probability ~2^-24, which at V = 128k would force a
        # uniformly random token about once in a hundred steps.
        exp = torch.stack([
            torch.empty(scores.shape[-1], dtype=torch.float64, device=scores.device).exponential_(generator=g)
            for g in self.generators
        ])  # (B, V)
        return scores.double() / self.temperature - exp.clamp_min(1e-300).log()


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    synced_gpus: bool | None = None,
) -> list[list[int]]:
    """One response per prompt, each ending with EOS unless it ran out of `max_new_tokens`.

    Sampling is seeded and does not disturb the caller's RNG state, so a resumed run draws the
    same samples as an uninterrupted one. With `row_seeds` (one per prompt) each prompt's sample is
    drawn from its own seeded stream (`PerRowGumbel`), so it does not depend on the batch it is in;
    otherwise the batch shares one stream seeded with `seed`. `synced_gpus` is passed to `generate`:
    set it when the parameters are sharded across ranks (FSDP, ZeRO-3), so a rank that finishes early
    keeps taking part in the others' forwards; every rank must then make the same number of calls
    with the same number of batches.
    """
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row_seeds for {len(prompts)} prompts")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Special tokens but EOS, and the padding rows of a padded embedding matrix (ids no token has;
    # a teacher refuses them, its signals live on the tokenizer's ids).
    padding = range(len(tokenizer), getattr(model.config, "vocab_size", None) or len(tokenizer))
    banned = sorted((set(tokenizer.all_special_ids) - {eos}) | set(padding))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding: every prompt ends where generation starts.
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, width - len(p) :] = torch.tensor(p)
                mask[b, width - len(p) :] = 1
            per_row = do_sample and row_seeds is not None
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                # Per-row streams: greedy decoding over the Gumbel-perturbed logits (an exact sample).
                do_sample=do_sample and not per_row,
                temperature=temperature if do_sample and not per_row else None,
                top_k=0 if do_sample and not per_row else None,
                top_p=1.0 if do_sample and not per_row else None,
                logits_processor=LogitsProcessorList(
                    [PerRowGumbel(row_seeds[i : i + batch_size], temperature, device)]) if per_row else None,
                eos_token_id=eos,
                pad_token_id=pad,
                suppress_tokens=banned or None,
                synced_gpus=synced_gpus,
            )[:, width:].cpu()
            for row in generated.tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    return out


@contextmanager
def generation_model(model: torch.nn.Module, accelerator) -> Iterator[PreTrainedModel]:
    """The model to call `generate` on, whatever wraps `model` (the trainer's `model_wrapped`).

    TRL's `unwrap_model_for_generation` strips DDP / FSDP wrappers, gathers DeepSpeed ZeRO-3
    parameters and turns gradient checkpointing off for the duration. Under FSDP1 the root's own
    parameters (embeddings, final norm, LM head) stay sharded once the wrapper is stripped, so they
    are summoned here with `recurse=False`, as TRL's online trainers do; the wrapped layers gather
    their own parameters in each forward. FSDP2 modules gather theirs in forward hooks. With sharded
    parameters each forward is a collective: pass `synced_gpus=True` to `generate_responses`.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(model, accelerator) as unwrapped:
        if isinstance(model, FullyShardedDataParallel):
            with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
                yield unwrapped
        else:
            yield unwrapped
