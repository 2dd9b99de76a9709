"""A draft head over a subset of the vocabulary (as in FR-Spec): the draft scores only its most
frequent tokens and gives every other token q = 0.

On a small target the full output layer is a large share of a draft step (49,152 x 576 rows for
SmolLM2: more than the draft's decoder layers), while a few thousand tokens cover most of what the
target writes. Speculative sampling stays exact with q = 0 outside the subset: such a token is never
drafted, and the target's residual max(0, p - q) keeps its full mass. A greedy draft proposes the
best token inside the subset.

The subset is a file beside the model's config (`head_tokens.json`: {"tokens": [ids]}); the model
folder is otherwise a standard one. `attach` marks a loaded model; the lean forward then computes
only those rows, and transformers' forward is masked to the same distribution.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HEAD_FILE = "head_tokens.json"
ATTR = "adasd_head_tokens"


def load(folder: str | Path) -> torch.Tensor | None:
    """The subset's token ids [N] (sorted, unique) of a model folder, or None for a full head."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    tokens = json.loads(path.read_text())["tokens"]
    ids = torch.tensor(sorted(set(int(t) for t in tokens)), dtype=torch.long)
    if ids.numel() == 0 or ids[0] < 0:
        raise ValueError(f"{path}: token ids must be non-negative and at least one")
    return ids


def save(folder: str | Path, tokens: list[int] | torch.Tensor) -> None:
    ids = sorted(set(int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)))
    (Path(folder) / HEAD_FILE).write_text(json.dumps({"tokens": ids}) + "\n")


def attach(model, tokens: torch.Tensor | None) -> None:
    width = model.get_output_embeddings().weight.shape[0]
    if tokens is not None and int(tokens.max()) >= width:
        raise ValueError(f"head token {int(tokens.max())} is past the model's output width {width}")
    setattr(model, ATTR, tokens)


def tokens_of(model) -> torch.Tensor | None:
    return getattr(model, ATTR, None)


def mask_logits(logits: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """Logits [..., V] with -inf outside the subset (transformers' forward of a subset-head draft)."""
    if tokens is None:
        return logits
    keep = torch.full_like(logits, float("-inf"))
    index = tokens.to(logits.device).expand(*logits.shape[:-1], -1)
    return keep.scatter_(-1, index, logits.gather(-1, index))
