"""Distilling the draft: a few of the target's own decoder layers, trained to give the target's
next-token distributions on text the target wrote, over the draft's head subset.

The draft keeps the target's token embeddings, frozen: its output layer is their rows for the
head subset (tied, as in the target), so the draft shares them with the target instead of
carrying its own. What trains is the decoder layers and the final norm.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class TrainPlan:
    steps: int
    batch_tokens: int  # tokens (padding included) per step
    lr: float
    warmup: int


@dataclass
class Record:
    """One conversation: its tokens, and at the positions the target wrote, the target's top-k."""

    ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [P] int32: index t of each token the target wrote
    top_ids: torch.Tensor  # [P, K] int32
    top_logprobs: torch.Tensor  # [P, K] float16


def draft_from_target(target, layers: tuple[int, ...]):
    """A Llama draft with `len(layers)` decoder layers copied from the target (its embeddings,
    rotary settings and final norm too)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(layers)
    for attr in ("layer_types",):  # per-layer lists sized to the target
        if getattr(cfg, attr, None) is not None:
            setattr(cfg, attr, [getattr(target.config, attr)[i] for i in layers])
    draft = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        draft.model.norm.weight.copy_(target.model.norm.weight)
        for dst, src in zip(draft.model.layers, layers):
            dst.load_state_dict(target.model.layers[src].state_dict())
    draft.tie_weights()
    draft.config._attn_implementation = "sdpa"
    return draft


def trainable(draft) -> list[torch.nn.Parameter]:
    draft.model.embed_tokens.weight.requires_grad_(False)
    params = [p for n, p in draft.named_parameters() if "embed_tokens" not in n and "lm_head" not in n]
    for p in params:
        p.requires_grad_(True)
    return params


def resume(ckpt: Path, model, opt) -> tuple[int, list]:
    """(step, curve) of a checkpoint, its weights and optimiser state loaded; (0, []) without one."""
    if not ckpt.exists():
        return 0, []
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["opt"])
    return state["step"], state["curve"]


def _lr(step: int, plan: TrainPlan) -> float:
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    t = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batches(records: list[Record], batch_tokens: int) -> list[list[int]]:
    """Records grouped by length (little padding), each group within `batch_tokens`."""
    order = sorted(range(len(records)), key=lambda i: (len(records[i].ids), i))
    groups, cur, cur_max = [], [], 0
    for i in order:
        n = len(records[i].ids)
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        groups.append(cur)
    return groups


def subset_index(head_tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V] -> position in the head subset, -1 outside it."""
    index = torch.full((vocab,), -1, dtype=torch.long)
    index[head_tokens] = torch.arange(head_tokens.numel())
    return index


def collate(records: list[Record], group: list[int], index: torch.Tensor, pad: int):
    """Right-padded inputs [B, T] (causal attention never reads the padding), and per taught position:
    its flat row in the output, the teacher's ids in the subset [P, K] (-1: outside) and log-probs."""
    rows = [records[i] for i in group]
    T = max(len(r.ids) for r in rows)
    inputs = torch.full((len(rows), T), pad, dtype=torch.long)
    flat, ids, lps = [], [], []
    for b, r in enumerate(rows):
        inputs[b, : len(r.ids)] = r.ids.long()
        keep = r.positions > 0
        flat.append(b * T + r.positions[keep].long() - 1)  # the output at t-1 predicts token t
        ids.append(index[r.top_ids[keep].long()])
        lps.append(r.top_logprobs[keep].float())
    return inputs, torch.cat(flat), torch.cat(ids), torch.cat(lps)


def soft_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the draft (log-softmax over the subset, [P, N]) against the teacher's top-k,
    renormalised over the tokens inside the subset: KL to the teacher up to a constant."""
    inside = teacher_ids >= 0
    lp = teacher_lp.masked_fill(~inside, float("-inf"))
    usable = inside.any(-1)
    p = torch.softmax(lp[usable], -1)
    logq = torch.log_softmax(student_logits[usable].float(), -1)
    picked = logq.gather(-1, teacher_ids[usable].clamp_min(0))
    return -(p * picked.masked_fill(~inside[usable], 0.0)).sum(-1).mean()


def train(draft, records: list[Record], head_tokens: torch.Tensor, plan: TrainPlan, seed: int, ckpt: Path,
          ckpt_every: int = 25, on_step: Callable[[int, float], None] | None = None,
          autocast_dtype: torch.dtype | None = None) -> list[tuple[int, float]]:
    """AdamW over the draft's decoder layers and norm; resumes from `ckpt` when it exists."""
    params = trainable(draft)
    opt = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.0)
    index = subset_index(head_tokens, draft.config.vocab_size)
    head_rows = draft.model.embed_tokens.weight.index_select(0, head_tokens).detach()  # [N, C], frozen
    groups = batches(records, plan.batch_tokens)
    pad = draft.config.eos_token_id if isinstance(draft.config.eos_token_id, int) else 0
    step, curve = resume(ckpt, draft, opt)
    draft.train()
    epoch_order: list[int] = []
    while step < plan.steps:
        epoch, at = divmod(step, len(groups))
        if at == 0 or not epoch_order:
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            epoch_order = torch.randperm(len(groups), generator=gen).tolist()
        inputs, flat, t_ids, t_lp = collate(records, groups[epoch_order[at]], index, pad)
        for g in opt.param_groups:
            g["lr"] = _lr(step, plan)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            hidden = draft.model(input_ids=inputs).last_hidden_state  # [B, T, C], final norm applied
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
            logits = F.linear(h, head_rows.to(h.dtype))  # [P, N]
        loss = soft_loss(logits, t_ids, t_lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        step += 1
        if step % 10 == 0 or step == plan.steps:
            curve.append((step, round(value, 4)))
        if on_step:
            on_step(step, value)
        if step % ckpt_every == 0 or step == plan.steps:
            tmp = ckpt.with_suffix(".tmp")
            model_state = {k: v for k, v in draft.state_dict().items()
                           if "embed_tokens" not in k and "lm_head" not in k}
            torch.save({"step": step, "model": model_state, "opt": opt.state_dict(), "curve": curve,
                        "time": time.time()}, tmp)
            os.replace(tmp, ckpt)
    draft.eval()
    return curve


@torch.inference_mode()
def agreement(draft, records: list[Record], head_tokens: torch.Tensor, batch_tokens: int = 4096) -> dict:
    """Greedy top-1 agreement with the teacher and mean soft loss over records (held-out text)."""
    index = subset_index(head_tokens, draft.config.vocab_size)
    head_rows = draft.model.embed_tokens.weight.index_select(0, head_tokens)
    pad = draft.config.eos_token_id if isinstance(draft.config.eos_token_id, int) else 0
    hits = total = 0
    losses = []
    for group in batches(records, batch_tokens):
        inputs, flat, t_ids, t_lp = collate(records, group, index, pad)
        hidden = draft.model(input_ids=inputs).last_hidden_state
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat), head_rows)
        best = head_tokens[logits.argmax(-1)]
        teacher_best = t_ids[:, 0]
        hits += (index[best] == teacher_best).sum().item()
        total += len(best)
        losses.append(soft_loss(logits, t_ids, t_lp).item())
    return {"top1_agreement": round(hits / max(total, 1), 4), "soft_loss": round(sum(losses) / max(len(losses), 1), 4),
            "positions": total}
