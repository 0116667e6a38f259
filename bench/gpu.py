"""Shared by the GPU benchmarks: the card's measured bf16 matmul rate, the denominator of MFU."""

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
