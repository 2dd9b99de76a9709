"""Device faults: which errors leave the worker unusable, and a test-only way to cause one.

A CUDA error other than out-of-memory (an illegal address, a device-side assert, a launch failure,
a cuBLAS or cuDNN failure) is sticky: the context it hit fails every later kernel, so the worker
cannot serve again and must be replaced by a fresh process. Out-of-memory is not: the allocator is
still sound, and only the requests of the step that did not fit fail.

Fault injection (tests and drills, never in production): start the server with
ADASD_DEBUG_FAULT_FILE=/some/path; when that file appears, the worker's next step raises the
fault its content names (FAULT_KINDS: "cuda" or "oom") and deletes the file, so one write causes
one fault and a restarted worker runs clean. Write it atomically (write elsewhere, then rename).
"""

from __future__ import annotations

import os

FAULT_FILE_ENV = "ADASD_DEBUG_FAULT_FILE"

# lower-case pieces of the messages torch, cuBLAS, cuDNN and Triton raise for device failures
DEVICE_FAULT_MARKERS = (
    "cuda error",
    "cuda driver error",
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "unspecified launch failure",
    "misaligned address",
    "cublas_status_",
    "cudnn_status_",
    "cudnn error",
    "triton error [cuda]",
    "uncorrectable ecc",
)
OUT_OF_MEMORY_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_device_fault(exc: BaseException) -> bool:
    """True if `exc`, or an error it was raised from or while handling, is a device failure the
    process cannot recover from (an accelerator error other than out-of-memory)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _sticky(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _sticky(exc: BaseException) -> bool:
    # torch raises all of these as RuntimeError subclasses; a request's own errors are not
    if not isinstance(exc, RuntimeError) or type(exc).__name__ == "OutOfMemoryError":
        return False
    text = str(exc).lower()
    if any(m in text for m in OUT_OF_MEMORY_MARKERS):
        return False
    return type(exc).__name__ == "AcceleratorError" or any(m in text for m in DEVICE_FAULT_MARKERS)


def summary(exc: BaseException) -> str:
    """The error's first line, short enough for a log line, /ready and /health."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


# ---------------------------------------------------------------------------- injection


def _cuda_fault() -> BaseException:
    return RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {FAULT_FILE_ENV})")


def _oom_fault() -> BaseException:
    import torch

    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (injected by {FAULT_FILE_ENV})")


FAULT_KINDS = {"cuda": _cuda_fault, "oom": _oom_fault}


class FaultFile:
    """The injection point: `check()` raises the fault named by the file, once, if it exists."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def from_env(cls) -> FaultFile | None:
        path = os.environ.get(FAULT_FILE_ENV)
        return cls(path) if path else None

    def check(self) -> None:
        try:
            with open(self.path) as f:
                kind = f.read().strip()
            os.remove(self.path)
        except FileNotFoundError:
            return
        make = FAULT_KINDS.get(kind)
        if make is None:
            raise ValueError(f"{FAULT_FILE_ENV}: unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
        raise make()
