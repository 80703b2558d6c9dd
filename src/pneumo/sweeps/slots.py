"""Where runs may execute on this machine: the visible GPUs, and the slots they and the CPU
cores are split into (a run takes a free slot, so no two runs ever share a GPU)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One run's share of the machine: a GPU (None: CPU only) and a number of CPU threads."""

    gpu: str | None
    threads: int

    def environment(self) -> dict[str, str]:
        """What a run's process needs to keep to its share; every BLAS the run may load is capped."""
        threads = str(self.threads)
        return {"CUDA_VISIBLE_DEVICES": self.gpu or "", "PNEUMO_THREADS": threads,
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


# where a loaded GPU driver shows on Linux: the NVIDIA kernel module (present before any device
# node exists: nvidia-modprobe creates those at the first CUDA call), its control node, WSL2's
# GPU, Jetson's integrated GPU, ROCm
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/nvhost-ctrl-gpu", "/dev/kfd")


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every CUDA device."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        # no GPU driver loaded: no CUDA device, and no need to import torch (2-5 s) to learn it
        return []
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def slots(gpus: list[str], max_parallel: int | None = None, cores: int | None = None) -> list[Slot]:
    """One slot per GPU (at most max_parallel), or the cores split into equal CPU slots;
    the cores are shared out either way (a GPU run still loads and scores on the CPU)."""
    cores = cores or os.cpu_count() or 1
    if gpus:
        n = min(len(gpus), max_parallel or len(gpus))
        return [Slot(gpu, max(1, cores // n)) for gpu in gpus[:n]]
    n = max(1, min(max_parallel or cores, cores))
    return [Slot(None, max(1, cores // n)) for _ in range(n)]
