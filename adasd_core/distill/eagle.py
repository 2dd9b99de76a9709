"""`adasd build-eagle`: an EAGLE-3 head for the SmolLM2 target, trained here from the target alone.

Stages, each resumed from what the work folder holds:
  users, answers  the target writes the conversations (as the draft build does: adasd_core.distill.build);
  states          the target reads each conversation once: the inputs of the head's three layers and its
                  last layer's output at every position (bf16, in shards);
  train           the head, with training-time test: step s of a position reads step s - 1's output there,
                  as drafting does (Eagle3Head.train_forward), against the target's distribution over the
                  head's vocabulary (the tokens the target wrote most often);
  export          the head in the published EAGLE-3 layout (bf16) into the package folder;
  report          per-step agreement on held-out conversations, the learning curve, sizes, build time.
Deterministic given the seed on one machine.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adasd_core import eagle
from adasd_core.distill.build import DraftBuildConfig, _records, _save_json, build_draft
from adasd_core.distill.train import Record, TrainPlan, _lr, batches, resume

STAGES = ("users", "answers", "states", "train", "export", "report")


def _data_config() -> DraftBuildConfig:
    return DraftBuildConfig(chat_prompts=1000, code_write=450, code_explain=200, max_conversations=1280,
                            answer_max_tokens=160)


@dataclass
class EagleBuildConfig:
    seed: int = 0
    data: DraftBuildConfig = field(default_factory=_data_config)
    draft_vocab: int = 8192
    ttt_steps: int = 4  # draft steps simulated per position in training
    step_decay: float = 0.8  # loss weight of step s: decay ** (s - 1)
    plan: TrainPlan = field(default_factory=lambda: TrainPlan(steps=500, batch_tokens=4096, lr=1e-3, warmup=30))
    shard: int = 128  # conversations per saved shard of states
    states_batch: int = 8  # conversations per target forward while reading states
    ckpt_every: int = 50

    @classmethod
    def quick(cls, seed: int = 0) -> EagleBuildConfig:
        return cls(seed=seed, data=DraftBuildConfig.quick(seed), draft_vocab=64, ttt_steps=2,
                   plan=TrainPlan(steps=4, batch_tokens=256, lr=1e-3, warmup=1), shard=4, states_batch=2, ckpt_every=2)


def _load_target(target: str, context: int):
    from adasd_core.models import load_pair

    return load_pair(target, None, device="cpu", dtype="float32", max_model_len=context)


def new_head(target, vocab_ids: torch.Tensor, aux: tuple[int, ...]) -> eagle.Eagle3Head:
    """A head for `target` that starts as an early exit: fc passes the highest captured layer's input
    through, the layer adds nothing (zero output projections), the norm and output rows are the target's
    own: step one then predicts what the target's last layers would, before any training."""
    from transformers import LlamaConfig

    tc = target.config
    c = tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or c // tc.num_attention_heads
    cfg = LlamaConfig(
        hidden_size=c, intermediate_size=tc.intermediate_size, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads, head_dim=head_dim, rms_norm_eps=tc.rms_norm_eps,
        vocab_size=tc.vocab_size, max_position_embeddings=tc.max_position_embeddings, hidden_act="silu",
        rope_parameters=dict(getattr(tc, "rope_parameters", None) or {"rope_type": "default",
                                                                     "rope_theta": tc.rope_theta}),
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
        tie_word_embeddings=False)
    cfg.draft_vocab_size = len(vocab_ids)
    head = eagle.Eagle3Head(cfg, c, tc.vocab_size, aux, embed=target.get_input_embeddings().weight.detach())
    torch.manual_seed(0)
    with torch.no_grad():
        for mod in head.modules():
            if isinstance(mod, torch.nn.Linear):
                torch.nn.init.normal_(mod.weight, std=0.02)
        head.fc.weight.zero_()
        head.fc.weight[:, (len(aux) - 1) * c :] = torch.eye(c)
        head.midlayer.self_attn.o_proj.weight.zero_()
        head.midlayer.mlp.down_proj.weight.zero_()
        head.norm.weight.copy_(target.model.norm.weight)
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[vocab_ids])
        head.d2t.copy_(vocab_ids - torch.arange(len(vocab_ids)))
        head.t2d.zero_()
        head.t2d[vocab_ids] = True
    return head


# ---------------------------------------------------------------------- states


@torch.inference_mode()
def read_states(target, records: list[Record], aux: tuple[int, ...], batch: int) -> list[dict]:
    """Per conversation: the head's input states [L, 3 C] and the target's last-layer output [L, C], bf16."""
    from adasd_core.kv_cache import SlotPool

    n_layers = target.config.num_hidden_layers
    capture = (*aux, n_layers)
    c = target.config.hidden_size
    longest = max(len(r.ids) for r in records)
    pool = SlotPool(target, batch, longest + 1)
    out = []
    for i in range(0, len(records), batch):
        group = records[i : i + batch]
        for s in range(len(group)):
            pool.clear(s)
        feeds = [r.ids.tolist() for r in group]
        _, states = pool.forward(list(range(len(group))), feeds, capture=capture)
        for rows in states.split([len(f) for f in feeds]):
            out.append({"aux": rows[:, : len(aux) * c].to(torch.bfloat16).clone(),
                        "last": rows[:, len(aux) * c :].to(torch.bfloat16).clone()})
    return out


# ---------------------------------------------------------------------- training


def _collate(records: list[Record], states: list[dict], group: list[int], steps: int, pad: int):
    rows = [records[i] for i in group]
    L = max(len(r.ids) for r in rows)
    B = len(rows)
    aux_w, last_w = states[group[0]]["aux"].shape[1], states[group[0]]["last"].shape[1]
    aux = torch.zeros(B, L, aux_w, dtype=torch.bfloat16)
    last = torch.zeros(B, L, last_w, dtype=torch.bfloat16)
    ids = torch.full((B, L + steps), pad, dtype=torch.long)
    lengths = torch.tensor([len(r.ids) for r in rows])
    for b, (r, i) in enumerate(zip(rows, group)):
        n = len(r.ids)
        aux[b, :n], last[b, :n], ids[b, :n] = states[i]["aux"], states[i]["last"], r.ids.long()
    return aux, last, ids, lengths


def _teacher(target, last: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """The target's log-probabilities over the head's vocabulary (renormalised there) [B, L, V_d]."""
    norm = target.model.norm
    rows = target.get_output_embeddings().weight[vocab_ids]
    h = F.rms_norm(last.float(), norm.weight.shape, norm.weight, target.config.rms_norm_eps)
    return torch.log_softmax(F.linear(h, rows).float(), -1)


def step_losses(head, target, vocab_ids, aux, last, ids, lengths, steps: int):
    """Per step s: (soft cross-entropy against the target, top-1 agreements, positions) over the index
    positions i whose prediction (token i + s + 1) lies inside the conversation."""
    outs = head.train_forward(aux.float(), ids, steps)
    with torch.no_grad():
        teacher = _teacher(target, last, vocab_ids)  # position p predicts token p + 1
    B, L = aux.shape[:2]
    idx = torch.arange(L)
    result = []
    for s, logits in enumerate(outs, start=1):
        valid = (idx[None] + s) < lengths[:, None]  # [B, L]: teacher row at position i + s exists
        t = torch.zeros_like(teacher)
        t[:, : L - s] = teacher[:, s:]
        lp = torch.log_softmax(logits.float(), -1)
        p = t.exp()
        ce = -(p * lp).sum(-1)
        n = valid.sum()
        loss = (ce * valid).sum() / n.clamp_min(1)
        hits = ((lp.argmax(-1) == t.argmax(-1)) & valid).sum()
        result.append((loss, int(hits), int(n)))
    return result


def train_head(head, target, vocab_ids, records, states, cfg: EagleBuildConfig, ckpt: Path, on_step=None,
               autocast_dtype: torch.dtype | None = None) -> list:
    plan = cfg.plan
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.0)
    groups = batches(records, plan.batch_tokens)
    pad = target.config.eos_token_id if isinstance(target.config.eos_token_id, int) else 0
    step, curve = resume(ckpt, head, opt)
    head.train()
    order: list[int] = []
    weights = [cfg.step_decay**s for s in range(cfg.ttt_steps)]
    while step < plan.steps:
        epoch, at = divmod(step, len(groups))
        if at == 0 or not order:
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order = torch.randperm(len(groups), generator=gen).tolist()
        aux, last, ids, lengths = _collate(records, states, groups[order[at]], cfg.ttt_steps, pad)
        for g in opt.param_groups:
            g["lr"] = _lr(step, plan)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            per_step = step_losses(head, target, vocab_ids, aux, last, ids, lengths, cfg.ttt_steps)
        loss = sum(w * ls for w, (ls, _, _) in zip(weights, per_step)) / sum(weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == plan.steps:
            curve.append([step, round(loss.item(), 4), [round(h / max(n, 1), 4) for _, h, n in per_step]])
        if on_step:
            on_step(step, loss.item())
        if step % cfg.ckpt_every == 0 or step == plan.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"step": step, "model": head.state_dict(), "opt": opt.state_dict(), "curve": curve,
                        "time": time.time()}, tmp)
            os.replace(tmp, ckpt)
    head.eval()
    head.requires_grad_(False)
    return curve


@torch.inference_mode()
def agreement(head, target, vocab_ids, records, states, cfg: EagleBuildConfig) -> dict:
    """Per training-time-test step: top-1 agreement with the target and soft loss on held-out conversations."""
    pad = target.config.eos_token_id if isinstance(target.config.eos_token_id, int) else 0
    hits = [0] * cfg.ttt_steps
    total = [0] * cfg.ttt_steps
    losses = [0.0] * cfg.ttt_steps
    for group in batches(records, cfg.plan.batch_tokens):
        aux, last, ids, lengths = _collate(records, states, group, cfg.ttt_steps, pad)
        for s, (loss, h, n) in enumerate(step_losses(head, target, vocab_ids, aux, last, ids, lengths, cfg.ttt_steps)):
            hits[s] += h
            total[s] += n
            losses[s] += loss.item() * n
    return {"top1_agreement_by_step": [round(h / max(n, 1), 4) for h, n in zip(hits, total)],
            "soft_loss_by_step": [round(v / max(n, 1), 4) for v, n in zip(losses, total)], "positions": total[0]}


# ---------------------------------------------------------------------- the build


def build_eagle(work: Path, out: Path, cfg: EagleBuildConfig | None = None, target: str = "smollm2",
                stages: tuple[str, ...] = STAGES, progress: bool = True) -> dict:
    from adasd_core.device import cpu_autocast_dtype

    cfg = cfg or EagleBuildConfig()
    work, out = Path(work), Path(out)
    (work / "data").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data_stages = tuple(s for s in ("users", "answers") if s in stages)
    if data_stages:
        build_draft(work, out, cfg.data, target=target, stages=data_stages, progress=progress)
    log_path = work / "eagle_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["config"] = asdict(cfg)
    log.setdefault("seconds", {})

    def timed(name: str, t0: float) -> None:
        log["seconds"][name] = round(log["seconds"].get(name, 0.0) + time.time() - t0, 1)
        _save_json(log_path, log)

    pair = _load_target(target, cfg.data.context)
    tgt = pair.target
    records, held = _records(work, cfg.data)
    everything = records + held
    n_layers = tgt.config.num_hidden_layers
    aux = eagle.default_aux_layers(n_layers)
    log["data"] = {"conversations": len(everything), "held_out": len(held),
                   "tokens": int(sum(len(r.ids) for r in everything)), "aux_layers": list(aux)}

    # the head's vocabulary: the tokens the target wrote most often, and the special ones
    vocab_path = work / "eagle_vocab.json"
    if not vocab_path.exists():
        counts = Counter()
        for r in records:
            counts.update(r.ids[r.positions.long()].tolist())
        tok = pair.tokenizer
        special = set(pair.eos_token_ids) | {t for t in (tok.bos_token_id, tok.pad_token_id) if t is not None}
        ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        chosen = sorted(list(dict.fromkeys([*sorted(special), *ranked]))[: cfg.draft_vocab])
        total = sum(counts.values())
        log["vocab"] = {"size": len(chosen), "coverage_train": round(sum(counts[t] for t in chosen) / max(total, 1), 4)}
        vocab_path.write_text(json.dumps({"tokens": chosen}))
    vocab_ids = torch.tensor(json.loads(vocab_path.read_text())["tokens"], dtype=torch.long)

    # ---------------------------------------------------------------- states
    shard_path = lambda k: work / "data" / f"states_{k:04d}.pt"  # noqa: E731
    n_shards = (len(everything) + cfg.shard - 1) // cfg.shard
    if "states" in stages:
        t0 = time.time()
        for k in range(n_shards):
            if not shard_path(k).exists():
                part = everything[k * cfg.shard : (k + 1) * cfg.shard]
                torch.save(read_states(tgt, part, aux, cfg.states_batch), shard_path(k))
                timed("states", t0)
                t0 = time.time()
    if not all(shard_path(k).exists() for k in range(n_shards)):
        return log
    states = [s for k in range(n_shards) for s in torch.load(shard_path(k), weights_only=False)]
    train_states, held_states = states[: len(records)], states[len(records) :]

    head = new_head(tgt, vocab_ids, aux)
    ckpt = work / "eagle_ckpt.pt"
    amp = cpu_autocast_dtype()
    if "train" in stages:
        if "agreement_init" not in log:
            log["agreement_init"] = agreement(head, tgt, vocab_ids, held, held_states, cfg)
            _save_json(log_path, log)
        t0 = time.time()
        log["train"] = {"plan": asdict(cfg.plan), "autocast": str(amp), "parameters": head.num_parameters_own()}

        def on_step(step: int, loss: float) -> None:
            if progress and (step % 10 == 0 or step == cfg.plan.steps):
                print(f"step {step}/{cfg.plan.steps} loss {loss:.4f} {time.time() - t0:.0f}s", flush=True)

        log["train"]["curve"] = train_head(head, tgt, vocab_ids, records, train_states, cfg, ckpt, on_step, amp)
        timed("train", t0)
        log["agreement_trained"] = agreement(head, tgt, vocab_ids, held, held_states, cfg)
        _save_json(log_path, log)
    elif ckpt.exists():
        head.load_state_dict(torch.load(ckpt, weights_only=False)["model"], strict=False)

    if "export" in stages:
        provenance = {"aux_layers": list(aux), "seed": cfg.seed, "ttt_steps": cfg.ttt_steps,
                      "train_steps": cfg.plan.steps}
        # min_posterior 1: the relaxed check off by default, as for the distilled draft, until its frontier is measured
        eagle.save(head, out, extra={"adasd_draft": {"min_posterior": 1.0, "built_by": "adasd build-eagle",
                                                     **provenance}})
        log["export"] = {"mib": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 2)}
        _save_json(log_path, log)
    if "report" in stages:
        (out / "build_log.json").write_text(json.dumps({k: v for k, v in log.items()}, indent=2) + "\n")
    _save_json(log_path, log)
    return log


def expected_positions(agreement_by_step: list[float]) -> float:
    """Tokens per round a chain of these per-step agreements would give (greedy, plus the bonus)."""
    total, run = 1.0, 1.0
    for a in agreement_by_step:
        run *= a
        total += run
    return total

