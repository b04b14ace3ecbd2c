"""What the machine can do, for choices that depend on it (never on a machine's name or speed).

A CPU without bfloat16 instructions emulates bfloat16 matrix products in software, many times slower than
float32 ones; CUDA GPUs of compute capability 8.0 and newer, and x86 CPUs with AVX512-BF16 or AMX, compute
them natively and faster than float32. `torch.compile` builds its kernels with a C++ compiler on a CPU and
with Triton on a CUDA GPU; without them it fails at the first step.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 matrix products natively (faster than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")
    return False


def use_tensor_cores(device: torch.device | str) -> None:
    """On a CUDA GPU, let float32 matrix products use its TF32 tensor cores
    (`torch.set_float32_matmul_precision("high")`, as nanoGPT and litgpt train), unless the program chose a
    precision already; elsewhere, nothing changes (the setting means nothing to a CPU)."""
    if torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")


def _cpu_has(probe: str) -> bool:
    # torch.cpu's instruction-set probes are private (underscored) and x86-only; a torch without one, or
    # another architecture, answers False: the float32 path is the safe default.
    check = getattr(torch.cpu, probe, None)
    return bool(check()) if callable(check) else False


def can_compile(device: torch.device | str) -> bool:
    """Whether `torch.compile` can build kernels for `device` here: a C++ compiler that its CPU backend finds
    (g++, clang++ on macOS, cl on Windows, or $CXX), or Triton for a CUDA GPU."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton())
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # raises when none of the compilers it searches for runs
            return True
    except Exception:  # a private API: any failure to find a compiler means "cannot", never a crash
        return False
    return False
