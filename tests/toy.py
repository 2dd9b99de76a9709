"""Toy models with hand-built logits: a Markov chain over a tiny vocabulary.

The next-token logits depend only on the last token (a [V, V] table), so the exact
distribution of any continuation is known, and the engine can be checked against it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from adasd_core.models import ModelPair


class MarkovLM(torch.nn.Module):
    """Looks like a transformers causal LM to the engine: logits[t] = table[input_ids[t]]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)
        self.config = None
        self.calls: list[int] = []  # tokens fed per forward, for counting passes

    def get_input_embeddings(self):
        return SimpleNamespace(weight=self.table)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        n = input_ids.shape[1]
        self.calls.append(n)
        if past_key_values is not None:
            # the cache stores the fed ids themselves, so tests can read back what it holds
            kv = input_ids.float().view(1, 1, n, 1)
            past_key_values.update(kv, kv, 0)
        logits = self.table[input_ids[0]][None]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


class CharTokenizer:
    """Token i is the letter chr(97 + i); with `eos`, the last id is EOS."""

    def __init__(self, vocab: int, eos: bool = False):
        self.vocab = vocab
        self.eos_token_id = vocab - 1 if eos else None

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 97 for c in text]}


def markov_pair(target_table, draft_table, eos: bool = False, context: int = 256) -> ModelPair:
    v = target_table.shape[0]
    return ModelPair(
        target=MarkovLM(target_table), draft=MarkovLM(draft_table) if draft_table is not None else None,
        tokenizer=CharTokenizer(v, eos), device=torch.device("cpu"), dtype=torch.float32,
        context_length=context, vocab_size=v, eos_token_ids={v - 1} if eos else set(),
    )


def random_tables(v: int, seed: int, sharpness: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(v, v, generator=g) * sharpness
    draft = target + torch.randn(v, v, generator=g) * sharpness  # related but different
    return target, draft


def sequence_probability(table: torch.Tensor, start: int, seq: list[int], temperature: float = 1.0) -> float:
    probs = torch.softmax(table.double() / temperature, dim=-1)
    p, prev = 1.0, start
    for t in seq:
        p *= float(probs[prev, t])
        prev = t
    return p


def fed_check(check, accepted=(), rejected=()):
    """A relaxed check that has seen these distances in each group (labelled by the standard check)."""
    for d in accepted:
        check.add(d, True)
    for d in rejected:
        check.add(d, False)
    return check
