"""The default pair's draft as a plain Llama folder for llama.cpp's convert_hf_to_gguf.py.

    python scripts/peers/llama_draft_folder.py OUT_DIR [--draft ~/.cache/adasd/smollm2-135m-instruct-draft]

adasd's draft predicts over a subset of the vocabulary (head_tokens.json; q = 0 elsewhere). A GGUF
has no such mask, so the folder gets an untied output matrix: the embedding rows of the subset,
zeros elsewhere (logit 0 there: below the subset's best in practice, so llama.cpp's greedy draft
picks what ours picks). Everything else is copied as is (bf16 weights, tokenizer, chat template).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--draft", default=str(Path.home() / ".cache/adasd/smollm2-135m-instruct-draft"))
    args = ap.parse_args(argv)
    src, out = Path(args.draft), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(src / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    tokens = torch.tensor(json.loads((src / "head_tokens.json").read_text())["tokens"])
    head = torch.zeros_like(embed)
    head[tokens] = embed[tokens]
    weights["lm_head.weight"] = head
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("adasd_draft", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    print(f"{out}: {len(tokens)} head tokens of {embed.shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
