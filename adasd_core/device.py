"""Device and dtype choices, in one place.

Everything that places a model or a tensor asks here, so CPU, CUDA and MPS behave the
same way across the engine, the server, the benchmarks and the demo build.
"""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc


def native_bf16(device: torch.device) -> bool:
    """Whether the card computes in bf16 natively: compute capability 8.0 (Ampere) or later. Older cards
    (T4, V100) emulate it slowly, though torch.cuda.is_bf16_supported() counts that emulation."""
    if torch.version.hip:  # ROCm: what torch reports is native
        return torch.cuda.is_bf16_supported()
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """`auto` is bf16 on CUDA (fp16 on cards without native bf16) and fp32 elsewhere."""
    if dtype == "auto":
        device = device or resolve_device()
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(sorted(DTYPES))}") from None


FOLD_ENV = "ADASD_FOLD_GQA"  # 1 / 0 forces the lean attention's layout (measurements, tests)


def fold_query_groups(device: torch.device) -> bool:
    """Whether the lean forward folds grouped query heads into the query rows (adasd_core.lean._attention)
    rather than passing enable_gqa: on CUDA a mask with enable_gqa has no fused kernel."""
    import os

    forced = os.environ.get(FOLD_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return True


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): a phase timed on an accelerator must
    end here, or it measures only the launches and the next phase pays for its kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def int_tensors(device: torch.device, *lists: list[int]) -> list[torch.Tensor]:
    """Integer lists as int64 tensors on the device in one copy: on an accelerator from pinned host
    memory without blocking (a plain torch.tensor(list, device=...) waits for the copy)."""
    flat = torch.tensor([x for values in lists for x in values], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return list(flat.split([len(values) for values in lists]))


def cpu_autocast_dtype() -> torch.dtype | None:
    """bf16 autocast for CPU training where the CPU has native bf16 (AVX512-BF16 / AMX)."""
    try:
        a = torch.randn(64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (a @ a).sum().item()
    except RuntimeError:
        return None
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return torch.bfloat16 if ("avx512" in cap or "amx" in cap) else None


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else what platform knows."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def device_identity(device: torch.device) -> str:
    """The hardware a measured plan belongs to: the GPU model and compute capability on CUDA, the CPU
    model elsewhere (MPS runs on the Apple chip the CPU model names)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return f"{device.type} {cpu_model()}"


def machine_info() -> dict:
    """What a benchmark result was measured on."""
    import os
    import platform

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def release_freed_host_memory() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim): a load's many large temporaries
    (the self-draft's scale search) otherwise stay resident, fragmented in the allocator's arenas."""
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).malloc_trim(0)
