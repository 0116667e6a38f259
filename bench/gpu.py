"""Shared by the GPU benchmarks: the card's name for the results files, and its measured bf16 matmul
rate, the denominator of MFU."""

import time

import torch


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return iters * 2 * n**3 / (time.perf_counter() - t) / 1e12


def hardware() -> str:
    """`NVIDIA H200, 140 GiB, torch 2.11.0+cu130`, or `CPU`: the hardware line of every results file."""
    if not torch.cuda.is_available():
        return "CPU"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 1024**3:.0f} GiB, torch {torch.__version__}"
