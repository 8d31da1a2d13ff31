"""Student samples y_hat for ADPA: stop at EOS (kept and scored), nothing after it, and no special
token other than EOS inside a response."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    batch_size: int = 64,
) -> list[list[int]]:
    """One response per prompt, each ending with EOS unless it ran out of `max_new_tokens`.

    Sampling is seeded and does not disturb the caller's RNG state, so a resumed run draws the
    same samples as an uninterrupted one.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    banned = sorted(set(tokenizer.all_special_ids) - {eos})
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
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_k=0 if do_sample else None,
                top_p=1.0 if do_sample else None,
                eos_token_id=eos,
                pad_token_id=pad,
                suppress_tokens=banned or None,
            )[:, width:].cpu()
            for row in generated.tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    return out
