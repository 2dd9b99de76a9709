"""The request's controls on the logits, before temperature and the rest (sampling.logits_to_probs):
logit_bias, the presence / frequency / repetition penalties, and the grammar's mask.

Every position is processed from the tokens before it, the round's forced tokens and earlier
candidates included, and the draft's rows exactly as the target's: the standard check then compares
two distributions of the same processed process, so the lossless methods stay exact with respect
to the processed target distribution. Penalties follow vLLM: presence and frequency count the
generated tokens; repetition counts the prompt's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adasd_core.grammar import apply_bitmask


@dataclass
class Rows:
    """One sequence's run of consecutive rows in a logits tensor, from row `start`: `extra` the tokens
    past seq.tokens (this round's forced tokens and candidates), `lengths[j]` how many of them precede
    row j, `masks` one grammar bitmask [W] per row (None: no grammar)."""

    seq: object  # adasd_core.sequence.Sequence
    start: int
    extra: list[int]  # tokens past seq.tokens that precede this run's rows
    lengths: list[int]  # per row, how many of `extra` precede it
    masks: list[torch.Tensor] | None = None


def process_logits(logits: torch.Tensor, runs: list[Rows], draft: bool = False) -> torch.Tensor:
    """logits [N, V] -> the processed logits (a new tensor where anything applies; else `logits`).
    `draft`: a row the mask empties (a draft head's subset) falls back to uniform over the allowed tokens."""
    runs = [r for r in runs if r.masks or r.seq.params.controls]
    if not runs:
        return logits
    out = logits.float().clone()
    V = out.shape[-1]
    for r in runs:
        params = r.seq.params
        if not params.controls:
            continue
        n = len(r.lengths)
        rows = out[r.start : r.start + n]
        dev = rows.device
        generated = r.seq.tokens[r.seq.prompt_len :]
        # counts [n, V] of the generated tokens before each row: the committed ones, then the run's prefix
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=dev), minlength=V)[:V]
        counts = counts.float()[None].repeat(n, 1)
        if r.extra:
            onehot = torch.zeros(len(r.extra) + 1, V, device=dev)
            onehot[torch.arange(1, len(r.extra) + 1, device=dev), torch.tensor(r.extra, device=dev)] = 1.0
            counts += onehot.cumsum(0)[torch.tensor(r.lengths, device=dev)]
        if params.repetition_penalty != 1.0:
            seen = counts > 0
            seen[:, torch.tensor(sorted(set(r.seq.prompt_ids)), device=dev)] = True
            penalised = torch.where(rows > 0, rows / params.repetition_penalty, rows * params.repetition_penalty)
            rows = torch.where(seen, penalised, rows)
        if params.frequency_penalty:
            rows = rows - params.frequency_penalty * counts
        if params.presence_penalty:
            rows = rows - params.presence_penalty * (counts > 0).float()
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), device=dev)
            bias = torch.tensor(list(params.logit_bias.values()), device=dev, dtype=rows.dtype)
            rows = rows.index_add(1, ids, bias[None].expand(n, -1).contiguous())
        out[r.start : r.start + n] = rows
    mask_rows = [r.start + j for r in runs if r.masks for j in range(len(r.masks))]
    apply_bitmask(out, mask_rows, [m for r in runs if r.masks for m in r.masks], uniform_fallback=draft)
    return out
