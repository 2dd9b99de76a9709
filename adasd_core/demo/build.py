"""Build the embedded demo pair: a byte-level BPE tokenizer, a Llama target, and a Llama draft
distilled from the target, all trained on the standard library's Python sources.

Stages (each skipped when its output exists, unless `force`): tokenizer -> target -> draft ->
report. Deterministic given the seed, the Python version (the corpus) and the machine.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adasd_core.demo.data import HELD_OUT, Corpus, load_corpus
from adasd_core.demo.report import make_report
from adasd_core.device import cpu_autocast_dtype

DEMO_DIR = Path(__file__).parent / "weights"

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


@dataclass
class TrainPlan:
    steps: int
    batch_size: int
    lr: float
    warmup: int


@dataclass
class BuildConfig:
    seed: int = 0
    vocab_size: int = 4096
    context: int = 512
    target: ModelShape = field(default_factory=lambda: ModelShape(256, 688, 12, 4))
    # the draft keeps the target's width: on a CPU a decode step costs about the same at 128 or 256
    # wide (per-layer overhead dominates), and it can start from the target's own layers
    draft: ModelShape = field(default_factory=lambda: ModelShape(256, 688, 2, 4))
    draft_init_layers: tuple[int, ...] = (0, -1)  # target layers copied into the draft before distillation
    target_train: TrainPlan = field(default_factory=lambda: TrainPlan(3600, 8, 1.5e-3, 200))
    draft_train: TrainPlan = field(default_factory=lambda: TrainPlan(1200, 8, 1.5e-3, 100))
    # second distillation of the draft on the target's own continuations, where decoding happens
    refine_sequences: int = 1024
    refine_prompt_tokens: int = 128
    refine_new_tokens: int = 256
    refine_temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)  # 0: greedy
    draft_refine: TrainPlan = field(default_factory=lambda: TrainPlan(500, 8, 5e-4, 50))
    max_files: int | None = None
    eval_windows: int = 48
    # torch threads while building (None: as set); the quick build uses 1, so that its bytes do not
    # depend on how two threads split its tiny reductions
    threads: int | None = None

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        return cls(
            seed=seed,
            threads=1,
            vocab_size=512,
            context=128,
            target=ModelShape(64, 172, 2, 2),
            draft=ModelShape(64, 172, 1, 2),
            draft_init_layers=(-1,),
            target_train=TrainPlan(40, 4, 3e-3, 5),
            draft_train=TrainPlan(30, 4, 3e-3, 5),
            refine_sequences=8,
            refine_prompt_tokens=32,
            refine_new_tokens=32,
            draft_refine=TrainPlan(10, 4, 1e-3, 2),
            max_files=30,
            eval_windows=4,
        )


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in corpus.train), trainer=trainer, length=len(corpus.train))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=CHAT_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 30
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def encode_corpus(tokenizer, docs: list[tuple[str, str]]) -> torch.Tensor:
    """One flat stream: each file followed by EOS. int32 [N]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for _, text in docs:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------- models


def llama_config(shape: ModelShape, tokenizer, context: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _batches(stream: torch.Tensor, plan: TrainPlan, seq: int, gen: torch.Generator):
    """Random windows of seq+1 tokens of a flat stream, or random rows of [N, L] sequences: [B, seq+1]."""
    if stream.dim() == 2:
        for _ in range(plan.steps):
            yield stream[torch.randint(0, stream.size(0), (plan.batch_size,), generator=gen)].long()
        return
    hi = stream.numel() - seq - 1
    for _ in range(plan.steps):
        starts = torch.randint(0, hi, (plan.batch_size,), generator=gen)
        yield torch.stack([stream[s : s + seq + 1] for s in starts.tolist()]).long()


def _lr(step: int, plan: TrainPlan) -> float:
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    t = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_model(
    model,
    stream: torch.Tensor,
    plan: TrainPlan,
    seq: int,
    seed: int,
    teacher=None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Next-token training; with a teacher, distillation: KL(teacher || student) per position."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.1)
    amp = cpu_autocast_dtype()
    model.train()
    curve = []
    for step, batch in enumerate(_batches(stream, plan, seq, gen)):
        for g in opt.param_groups:
            g["lr"] = _lr(step, plan)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(input_ids=inputs).logits
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=inputs).logits
        logits = logits.float()
        if teacher is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        else:
            teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
            kl = F.kl_div(F.log_softmax(logits, dim=-1), teacher_logp, log_target=True, reduction="none")
            loss = kl.sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if step % 50 == 0 or step == plan.steps - 1:
            curve.append((step, round(value, 4)))
        if on_step:
            on_step(step, value)
    model.eval()
    return curve


@torch.inference_mode()
def target_continuations(
    model, stream: torch.Tensor, cfg: BuildConfig, batch_size: int = 32, on_batch: Callable[[int], None] | None = None
) -> torch.Tensor:
    """The target continues random corpus windows: [refine_sequences, prompt + new] int32.

    Batches cycle through cfg.refine_temperatures (0 = greedy); EOS does not stop a row, as in
    the corpus stream, where a new file follows."""
    from adasd_core.kv_cache import hf_forward

    gen = torch.Generator().manual_seed(cfg.seed + 2)
    p_len, n_new = cfg.refine_prompt_tokens, cfg.refine_new_tokens
    rows = []
    for b, start in enumerate(range(0, cfg.refine_sequences, batch_size)):
        n = min(batch_size, cfg.refine_sequences - start)
        starts = torch.randint(0, stream.numel() - p_len, (n,), generator=gen).tolist()
        seqs = torch.stack([stream[s : s + p_len] for s in starts]).long()  # [n, P]
        temperature = cfg.refine_temperatures[b % len(cfg.refine_temperatures)]
        cache, feed = None, seqs  # equal lengths: transformers' own batched forward
        for _ in range(n_new):
            logits, cache = hf_forward(model, feed, cache)
            logits = logits[:, -1].float()
            if temperature > 0:
                feed = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)
            else:
                feed = logits.argmax(-1, keepdim=True)  # [n, 1]
            seqs = torch.cat([seqs, feed], dim=1)
        rows.append(seqs.int())
        if on_batch:
            on_batch(start + n)
    return torch.cat(rows)


def init_from_teacher(student, teacher, layers: tuple[int, ...]) -> None:
    """Start the draft from the target: its embeddings, final norm and the chosen decoder layers."""
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
        student.model.norm.weight.copy_(teacher.model.norm.weight)
        for dst, src in zip(student.model.layers, layers):
            dst.load_state_dict(teacher.model.layers[src].state_dict())


def _save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # bf16 on disk keeps the pair small; loading upcasts to the device's dtype.
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------- build


def build(
    out: Path = DEMO_DIR,
    cfg: BuildConfig | None = None,
    force: bool = False,
    stages: tuple[str, ...] = ("tokenizer", "target", "draft", "refine", "report"),
    progress: bool = True,
) -> dict:
    cfg = cfg or BuildConfig()
    out = Path(out)
    tok_dir, target_dir, draft_dir = out / "tokenizer", out / "target", out / "draft"
    log_path = out / "build_log.json"
    out.mkdir(parents=True, exist_ok=True)
    log = json.loads(log_path.read_text()) if log_path.exists() and not force else {}
    log["config"] = asdict(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _build(out, cfg, force, stages, progress, log, log_path, tok_dir, target_dir, draft_dir)
    finally:
        torch.set_num_threads(threads)


def _build(out, cfg, force, stages, progress, log, log_path, tok_dir, target_dir, draft_dir) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    corpus = load_corpus(max_files=cfg.max_files)

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress,
    )
    with bar:
        have_tok = (target_dir / "tokenizer.json").exists() or (tok_dir / "tokenizer.json").exists()
        if "tokenizer" in stages and (force or not have_tok):
            t0 = time.time()
            task = bar.add_task("tokenizer", total=1, info="")
            train_tokenizer(corpus, cfg.vocab_size, tok_dir)
            bar.update(task, advance=1)
            log["tokenizer"] = {"seconds": round(time.time() - t0, 1), "vocab_size": cfg.vocab_size}
        tokenizer = AutoTokenizer.from_pretrained(
            tok_dir if (tok_dir / "tokenizer.json").exists() else target_dir
        )
        train_stream = encode_corpus(tokenizer, corpus.train)
        held_stream = encode_corpus(tokenizer, corpus.held_out)
        log["corpus"] = {
            "train_files": len(corpus.train), "train_tokens": train_stream.numel(),
            "held_out_files": len(corpus.held_out), "held_out_tokens": held_stream.numel(),
            "held_out_modules": list(HELD_OUT), "python": platform.python_version(),
            "bytes_per_token": round(sum(len(t.encode()) for _, t in corpus.train) / train_stream.numel(), 3),
        }

        def run(name: str, shape: ModelShape, plan: TrainPlan, dest: Path, teacher=None):
            torch.manual_seed(cfg.seed + (1 if teacher is not None else 0))
            model = LlamaForCausalLM(llama_config(shape, tokenizer, cfg.context))
            model.config._attn_implementation = "sdpa"
            if teacher is not None and cfg.draft_init_layers:
                init_from_teacher(model, teacher, cfg.draft_init_layers)
            task = bar.add_task(name, total=plan.steps, info="")
            ema = [None]

            def on_step(step: int, loss: float) -> None:
                ema[0] = loss if ema[0] is None else 0.98 * ema[0] + 0.02 * loss
                bar.update(task, completed=step + 1, info=f"loss {ema[0]:.3f}")

            t0 = time.time()
            curve = train_model(model, train_stream, plan, cfg.context, cfg.seed, teacher, on_step)
            _save(model, tokenizer, dest)
            log[name] = {
                "seconds": round(time.time() - t0, 1),
                "parameters": sum(p.numel() for p in model.parameters()),
                "shape": asdict(shape), "plan": asdict(plan), "loss_curve": curve,
            }
            log_path.write_text(json.dumps(log, indent=2))
            return model

        if "target" in stages and (force or not (target_dir / "model.safetensors").exists()):
            run("target", cfg.target, cfg.target_train, target_dir)
        if "draft" in stages and (force or not (draft_dir / "model.safetensors").exists()):
            teacher = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
            run("draft", cfg.draft, cfg.draft_train, draft_dir, teacher=teacher)
            log.pop("refine", None)
        if "refine" in stages and (force or "refine" not in log) and cfg.refine_sequences:
            teacher = LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
            student = LlamaForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
            student.config._attn_implementation = "sdpa"
            t0 = time.time()
            task = bar.add_task("target continuations", total=cfg.refine_sequences, info="")
            data = target_continuations(teacher, train_stream, cfg, on_batch=lambda n: bar.update(task, completed=n))
            gen_s = time.time() - t0
            task = bar.add_task("refine draft", total=cfg.draft_refine.steps, info="")
            curve = train_model(student, data, cfg.draft_refine, data.size(1) - 1, cfg.seed + 3, teacher,
                                lambda step, loss: bar.update(task, completed=step + 1, info=f"loss {loss:.3f}"))
            _save(student, tokenizer, draft_dir)
            log["refine"] = {"seconds": round(time.time() - t0, 1), "generation_seconds": round(gen_s, 1),
                             "tokens": data.numel(), "plan": asdict(cfg.draft_refine), "loss_curve": curve}
            log_path.write_text(json.dumps(log, indent=2))
        if (target_dir / "tokenizer.json").exists():
            shutil.rmtree(tok_dir, ignore_errors=True)

    if "report" in stages:
        log["report"] = make_report(out, held_stream, cfg)
    log_path.write_text(json.dumps(log, indent=2))
    return log


def quick_pair() -> tuple[str, str]:
    """A quick pair built in seconds in a temporary folder: (target, draft) paths, for scripts
    run without a model."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="adasd-quick-"))
    build(out, BuildConfig.quick(), stages=("tokenizer", "target", "draft"), progress=False)
    return str(out / "target"), str(out / "draft")
