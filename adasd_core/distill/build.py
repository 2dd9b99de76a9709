"""`adasd build-draft`: the SmolLM2 draft, built here from the target alone.

Stages, each resumed from what the work folder already holds (a stopped build picks up where it
was: finished shards of generated text are kept, training restarts from its last checkpoint):
  users    the target writes user messages (Magpie) for the chat half of the prompts;
  answers  the target answers them and the code prompts, greedy and sampled, keeping its top-k;
  head     the draft's vocabulary subset: the tokens the target wrote most often;
  train    the draft: a few of the target's layers, distilled on that text;
  export   the draft's own weights (bf16), config and head into the package folder;
  report   acceptance on the held-out prompts, step costs, sizes, build time.
Deterministic given the seed on one machine (batched floating point may round differently on
another CPU, and sampled text follows).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adasd_core.distill.generate import Job, chat_prompt, user_turn, write
from adasd_core.distill.prompts import HeldOut, code_prompts, eval_prompts
from adasd_core.distill.train import Record, TrainPlan, agreement, draft_from_target, train

STAGES = ("users", "answers", "head", "train", "export", "report")


@dataclass
class DraftBuildConfig:
    seed: int = 0
    chat_prompts: int = 3000  # user messages the target writes (some are dropped: too short, unfinished)
    code_write: int = 1000
    code_explain: int = 500
    # answers written for at most this many of the shuffled prompts (0: all): 8 shards, what the 2-hour budget allows
    max_conversations: int = 2048
    user_max_tokens: int = 80
    answer_max_tokens: int = 192
    # answers cycle through them (0: greedy): greedy text weighs double, as greedy serving is the common case
    temperatures: tuple[float, ...] = (0.0, 0.7, 0.0, 1.0)
    top_k: int = 20  # teacher log-probs kept per written token
    slots: int = 48  # sequences the target writes at once
    context: int = 1024
    shard: int = 256  # answers per saved shard
    held_out_share: float = 0.03  # conversations kept out of training to measure agreement
    head_size: int = 8192
    init_layers: tuple[int, ...] = (0, 1, 2, -1)  # target layers the draft starts from
    plan: TrainPlan = field(default_factory=lambda: TrainPlan(steps=700, batch_tokens=4096, lr=1e-3, warmup=30))
    eval_max_tokens: int = 128

    @classmethod
    def quick(cls, seed: int = 0) -> DraftBuildConfig:
        return cls(seed=seed, chat_prompts=6, code_write=3, code_explain=2, user_max_tokens=16, answer_max_tokens=16,
                   slots=4, context=256, shard=4, held_out_share=0.2, head_size=64, init_layers=(0, -1),
                   plan=TrainPlan(steps=4, batch_tokens=256, lr=1e-3, warmup=1), eval_max_tokens=8)


def _load_target(target: str, context: int):
    from adasd_core.models import load_pair

    return load_pair(target, None, device="cpu", dtype="float32", max_model_len=context)


def _engine(pair, slots: int):
    from adasd_core.llm import LLM

    return LLM(pair, calibrate=False, max_running=slots)


def _save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _written_to_dict(w) -> dict:
    return {"tokens": w.tokens, "top_ids": w.top_ids, "top_logprobs": w.top_logprobs, "finish": w.finish_reason}


def build_draft(work: Path, out: Path, cfg: DraftBuildConfig | None = None, target: str = "smollm2",
                stages: tuple[str, ...] = STAGES, progress: bool = True) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cfg = cfg or DraftBuildConfig()
    work, out = Path(work), Path(out)
    (work / "data").mkdir(parents=True, exist_ok=True)
    log_path = work / "build_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["config"] = asdict(cfg)
    log.setdefault("seconds", {})
    torch.manual_seed(cfg.seed)
    pair = _load_target(target, cfg.context)
    tok = pair.tokenizer
    held = HeldOut([p["prompt"] for p in eval_prompts()])
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress)

    def timed(name: str, t0: float) -> None:
        log["seconds"][name] = round(log["seconds"].get(name, 0.0) + time.time() - t0, 1)
        _save_json(log_path, log)

    with bar:
        # ---------------------------------------------------------------- users (Magpie)
        users_path = work / "data" / "users.pt"
        before, after = user_turn(tok)
        eos = tok.eos_token_id
        if "users" in stages and not users_path.exists():
            t0 = time.time()
            jobs = [Job(before, cfg.user_max_tokens, 1.0, cfg.seed * 1_000_003 + i, top_p=0.95)
                    for i in range(cfg.chat_prompts)]
            task = bar.add_task("target writes user messages", total=len(jobs), info="")
            written = write(_engine(pair, cfg.slots), jobs, cfg.top_k, lambda n: bar.update(task, completed=n))
            torch.save([_written_to_dict(w) for w in written], users_path)
            timed("users", t0)

        # ---------------------------------------------------------------- answers
        if "answers" in stages:
            users = torch.load(users_path, weights_only=False)
            closing = after[1:] if after and after[0] == eos else after  # the user turn's EOS was written
            convs = []  # (prompt ids, teacher of the prompt's written part or None)
            for u in users:
                text = tok.decode(u["tokens"], skip_special_tokens=True)
                if u["finish"] != "stop" or len(u["tokens"]) < 5 or held.overlaps(text):
                    continue
                convs.append((before + u["tokens"] + closing, u))
            for p in code_prompts(cfg.seed, cfg.code_write, cfg.code_explain, held):
                convs.append((chat_prompt(tok, p), None))
            room = pair.context_length - cfg.answer_max_tokens  # a prompt must leave room for its answer
            convs = [c for c in convs if len(c[0]) <= room]
            random.Random(cfg.seed).shuffle(convs)
            if cfg.max_conversations:
                convs = convs[: cfg.max_conversations]
            n_chat = sum(user is not None for _, user in convs)
            log["prompts"] = {"chat": n_chat, "code": len(convs) - n_chat, "users_written": len(users)}
            temps = cfg.temperatures
            jobs = [Job(ids, cfg.answer_max_tokens, temps[i % len(temps)], cfg.seed * 7_000_003 + i)
                    for i, (ids, _) in enumerate(convs)]
            # one stream of jobs through the engine; a shard is saved once all its answers are in
            n_shards = (len(jobs) + cfg.shard - 1) // cfg.shard
            path = lambda k: work / "data" / f"answers_{k:04d}.pt"  # noqa: E731
            todo = [i for i in range(len(jobs)) if not path(i // cfg.shard).exists()]
            task = bar.add_task("target answers", total=len(jobs), info="")
            bar.update(task, completed=len(jobs) - len(todo))
            if todo:
                since = [time.time()]  # build time is logged shard by shard, so a stopped build keeps it
                got: dict[int, dict] = {}

                def on_result(j: int, w) -> None:
                    i = todo[j]
                    got[i] = {"prompt": convs[i][0], "user": _written_to_dict_or_none(convs[i][1], len(before)),
                              "answer": _written_to_dict(w)}
                    k = i // cfg.shard
                    members = range(k * cfg.shard, min((k + 1) * cfg.shard, len(jobs)))
                    if all(m in got for m in members):
                        torch.save([got.pop(m) for m in members], path(k))
                        timed("answers", since[0])
                        since[0] = time.time()

                write(_engine(pair, cfg.slots), [jobs[i] for i in todo], cfg.top_k,
                      lambda n: bar.update(task, completed=len(jobs) - len(todo) + n), on_result)
            log["answers"] = {"shards": n_shards}
        if not set(stages) - {"users", "answers"}:  # the conversations only (build-eagle reads them)
            _save_json(log_path, log)
            return log

        records, held_records = _records(work, cfg)
        log["data"] = {"conversations": len(records) + len(held_records), "held_out": len(held_records),
                       "taught_tokens": int(sum(len(r.positions) for r in records)),
                       "tokens": int(sum(len(r.ids) for r in records))}

        # ---------------------------------------------------------------- head
        head_path = work / "head_tokens.json"
        if "head" in stages and not head_path.exists():
            counts = Counter()
            for r in records:
                counts.update(r.ids[r.positions.long()].tolist())
            special = set(pair.eos_token_ids) | {t for t in (tok.bos_token_id, tok.pad_token_id) if t is not None}
            ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            chosen = list(dict.fromkeys([*sorted(special), *ranked]))[: cfg.head_size]
            total = sum(counts.values())
            covered = sum(counts[t] for t in chosen)
            head_path.write_text(json.dumps({"tokens": sorted(chosen)}))
            held_counts = Counter()
            for r in held_records:
                held_counts.update(r.ids[r.positions.long()].tolist())
            chosen_set = set(chosen)
            log["head"] = {"size": len(chosen), "distinct_written": len(counts),
                           "coverage_train": round(covered / max(total, 1), 4),
                           "coverage_held_out": round(sum(c for t, c in held_counts.items() if t in chosen_set)
                                                      / max(sum(held_counts.values()), 1), 4)}
            _save_json(log_path, log)
        head_tokens = torch.tensor(json.loads(head_path.read_text())["tokens"], dtype=torch.long)

        # ---------------------------------------------------------------- train
        n_layers = pair.target.config.num_hidden_layers
        layers = tuple(i % n_layers for i in cfg.init_layers)
        draft = draft_from_target(pair.target, layers)
        ckpt = work / "train_ckpt.pt"
        if "train" in stages:
            from adasd_core.device import cpu_autocast_dtype

            if "agreement_init" not in log:
                log["agreement_init"] = agreement(draft, held_records, head_tokens)
            t0 = time.time()
            task = bar.add_task("distil draft", total=cfg.plan.steps, info="")
            ema = [None]

            def on_step(step: int, loss: float) -> None:
                ema[0] = loss if ema[0] is None else 0.95 * ema[0] + 0.05 * loss
                bar.update(task, completed=step, info=f"loss {ema[0]:.3f}")

            amp = cpu_autocast_dtype()
            log["train"] = {"plan": asdict(cfg.plan), "init_layers": list(layers), "autocast": str(amp),
                            "parameters_trained": sum(p.numel() for n, p in draft.named_parameters()
                                                      if "embed_tokens" not in n)}
            curve = train(draft, records, head_tokens, cfg.plan, cfg.seed, ckpt, on_step=on_step, autocast_dtype=amp)
            log["train"]["loss_curve"] = curve
            timed("train", t0)
            log["agreement_trained"] = agreement(draft, held_records, head_tokens)
            _save_json(log_path, log)
        elif ckpt.exists():
            draft.load_state_dict(torch.load(ckpt, weights_only=False)["model"], strict=False)

        # ---------------------------------------------------------------- export
        if "export" in stages:
            export(draft, tok, head_tokens, out, provenance={"layers_from_target": list(layers), "seed": cfg.seed})
            log["export"] = {"mib": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 2)}
            _save_json(log_path, log)

    if "report" in stages:
        from adasd_core.distill.report import report

        t0 = time.time()
        log["report"] = report(pair, out, work, cfg)
        timed("report", t0)
    _save_json(log_path, log)
    return log


def _written_to_dict_or_none(user: dict | None, offset: int) -> dict | None:
    return None if user is None else {**user, "offset": offset}


def _records(work: Path, cfg: DraftBuildConfig) -> tuple[list[Record], list[Record]]:
    """Every conversation of the answer shards as a Record; a seeded share held out."""
    records = []
    for path in sorted((work / "data").glob("answers_*.pt")):
        for conv in torch.load(path, weights_only=False):
            prompt, user, answer = conv["prompt"], conv["user"], conv["answer"]
            ids = prompt + answer["tokens"]
            pos = list(range(len(prompt), len(ids)))
            top_ids, top_lp = list(answer["top_ids"]), list(answer["top_logprobs"])
            if user is not None:
                off = user["offset"]
                pos = list(range(off, off + len(user["tokens"]))) + pos
                top_ids, top_lp = user["top_ids"] + top_ids, user["top_logprobs"] + top_lp
            records.append(Record(torch.tensor(ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32),
                                  torch.tensor(top_ids, dtype=torch.int32), torch.tensor(top_lp, dtype=torch.float16)))
    rng = random.Random(cfg.seed + 11)
    n_held = max(1, int(round(cfg.held_out_share * len(records))))
    held = set(rng.sample(range(len(records)), n_held)) if records else set()
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def export(draft, tokenizer, head_tokens: torch.Tensor, out: Path, provenance: dict) -> None:
    """The draft's own tensors (bf16), its config and head subset; the embeddings stay with the target."""
    from safetensors.torch import save_file

    from adasd_core import draft_head

    out.mkdir(parents=True, exist_ok=True)
    own = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in draft.state_dict().items()
           if "embed_tokens" not in k and "lm_head" not in k}
    save_file(own, out / "model.safetensors", metadata={"format": "pt"})
    cfg = draft.config.to_dict()
    cfg["dtype"] = "bfloat16"
    # int8 weights on the CPU (adasd_core.lean.int8_weights): the same acceptance at 0.6x the step
    # (docs/default-pair.md)
    # min_posterior: the relaxed check's gate from the pair's frontier (docs/methods.md: "The relaxed check on the
    # default pair"); a new draft keeps it until its own frontier is measured
    cfg["adasd_draft"] = {"shared_with_target": ["model.embed_tokens.weight"], "head_tokens": len(head_tokens),
                          "int8_weights": True, "min_posterior": 1.0, **provenance}
    cfg.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    draft.generation_config.to_json_file(out / "generation_config.json")
    draft_head.save(out, head_tokens)
