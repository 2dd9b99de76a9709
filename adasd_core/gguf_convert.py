"""A GGUF file -> a standard Hugging Face folder (config, safetensors, tokenizer, chat template).

transformers reads a GGUF and dequantizes it (`from_pretrained(dir, gguf_file=...)`, with the `gguf`
package installed), but a model loaded that way refuses `save_pretrained`. So the weights are moved
into a model built afresh from the same config, without its quantization entry, and saved from
there. The result loads with a plain `from_pretrained(folder)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# transformers 5 names its tokenizers-backed class TokenizersBackend, which 4.x does not know;
# PreTrainedTokenizerFast reads the same tokenizer.json in both
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def convert(gguf_path: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model in `gguf_path` as a Hugging Face folder at `out` (replaced if present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    tok_cfg.pop("is_local", None)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
