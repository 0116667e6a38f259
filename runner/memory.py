"""Peak-memory measurement (GPU allocator stats, or tensor bytes on CPU) in GiB everywhere.

On CPU there is no allocator to ask, so `TensorMemory` counts live tensor storages the way the CUDA
caching allocator's `allocated` counter would (weights, LoRA params, grads, optimizer state,
activations, temporaries), and can enforce a ceiling by raising `torch.OutOfMemoryError`: a probe
that would OOM on the target card also OOMs on a CPU, so the tuner is testable without a GPU.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3


def gib(nbytes: float) -> float:
    return nbytes / GIB


class TensorMemory(TorchDispatchMode):
    """Live tensor bytes created under this mode (plus `baseline` tensors), with a running peak."""

    def __init__(self, baseline: list[torch.Tensor] = (), limit_bytes: float | None = None):
        super().__init__()
        self.limit_bytes = limit_bytes
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0
        for t in baseline:
            self._track(t)

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live or st.nbytes() == 0:
            return
        self._live[key] = (weakref.ref(st, lambda _ref, key=key: self._release(key)), st.nbytes())
        self.current += st.nbytes()
        if self.current > self.peak:
            self.peak = self.current
        if self.limit_bytes is not None and self.current > self.limit_bytes:
            raise torch.OutOfMemoryError(
                f"tensor memory {gib(self.current):.3f} GiB exceeds the ceiling {gib(self.limit_bytes):.3f} GiB")

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class PeakMemory:
    """Per-phase peaks on one device: CUDA allocator stats, or a `TensorMemory` on CPU."""

    def __init__(self, device: torch.device, baseline: list[torch.Tensor] = (), limit_gib: float | None = None):
        self.device = device
        self.tensors = None
        if device.type != "cuda":
            self.tensors = TensorMemory(baseline, limit_gib * GIB if limit_gib else None)

    def __enter__(self):
        if self.tensors is not None:
            self.tensors.__enter__()
        return self

    def __exit__(self, *exc):
        if self.tensors is not None:
            self.tensors.__exit__(*exc)

    def reset(self) -> None:
        if self.tensors is not None:
            self.tensors.reset_peak()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks_gib(self) -> dict[str, float]:
        """peak_allocated_gib / peak_reserved_gib since the last reset (equal on CPU)."""
        if self.tensors is not None:
            p = gib(self.tensors.peak)
            return {"peak_allocated_gib": p, "peak_reserved_gib": p}
        return {"peak_allocated_gib": gib(torch.cuda.max_memory_allocated(self.device)),
                "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(self.device))}


def use_expandable_segments() -> bool:
    """Turn on the CUDA caching allocator's expandable segments for this process, before it allocates (unless
    PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF already says how). True where it was turned on."""
    if any("expandable_segments" in os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return False
    setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; before: the cuda one
    (setting or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    return True


def cap_gpu_memory(device: torch.device, gpu_memory_gib: float) -> bool:
    """Make this process's allocator OOM past `gpu_memory_gib`, as it would on a card of that size.
    False (no cap) where the card in hand is that small or smaller: the card itself is the limit."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gpu_memory_gib * GIB / total
    if fraction >= 1:
        return False
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return True


class ProcessMemory:
    """This process's whole footprint on its GPU, as nvidia-smi shows it (NVML's per-process used
    memory: the allocator's pool plus the CUDA context, cuBLAS workspaces and loaded kernels), sampled
    by a thread every `interval_s`; `peak_gib` is None where NVML cannot see this process (no driver
    library, or a container whose process ids NVML does not report)."""

    def __init__(self, device: torch.device, interval_s: float = 0.5):
        self.peak_bytes, self._stop, self._read = 0, threading.Event(), None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pid = os.getpid()

            def read() -> int | None:
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == pid and p.usedGpuMemory is not None:
                        return p.usedGpuMemory
                return None
            if read() is None:
                return
            self._read, self.interval_s = read, interval_s
            threading.Thread(target=self._loop, daemon=True).start()
        except Exception:
            self._read = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        try:
            used = self._read() if self._read else None
        except Exception:
            used = None
        if used:
            self.peak_bytes = max(self.peak_bytes, used)

    @property
    def peak_gib(self) -> float | None:
        if self._read is None:
            return None
        self.sample()
        return gib(self.peak_bytes)

    def reset(self) -> None:
        self.peak_bytes = 0

    def close(self) -> None:
        self._stop.set()
