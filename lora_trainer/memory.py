"""Memory figures of a run, and the proof that it holds no second copy of the model: the storage
(data pointer, dtype, device) of every UNet/text-encoder/VAE tensor is fingerprinted when the run starts
and checked again at each epoch end and at the end. Reported in the run's status (the tab shows it)."""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def storage_fingerprint(modules: Iterable[nn.Module]) -> str:
    h = hashlib.sha256()
    for root in modules:
        for name, t in root.state_dict(keep_vars=True).items():
            h.update(f"{name}:{t.data_ptr()}:{t.dtype}:{t.device}".encode())
    return h.hexdigest()[:16]


class MemoryWatch:
    def __init__(self, modules, device: torch.device):
        self.modules = list(modules)
        self.cuda = device.type == "cuda"
        self.device = device
        self.storage = storage_fingerprint(self.modules)
        self.rss_idle = rss_mb()
        self.rss_peak = self.rss_idle
        self.cuda_idle = self.cuda_peak = 0.0
        if self.cuda:
            torch.cuda.synchronize(device)
            self.cuda_idle = torch.cuda.memory_allocated(device) / 2 ** 20
            torch.cuda.reset_peak_memory_stats(device)
        self.storage_same = True

    def sample(self) -> Dict[str, Optional[float]]:
        self.rss_peak = max(self.rss_peak, rss_mb())
        if self.cuda:
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated(self.device) / 2 ** 20)
        self.storage_same = self.storage_same and storage_fingerprint(self.modules) == self.storage
        return self.figures()

    def figures(self) -> Dict[str, Optional[float]]:
        return {"rss_idle_mb": round(self.rss_idle, 1), "rss_peak_mb": round(self.rss_peak, 1),
                "cuda_idle_mb": round(self.cuda_idle, 1) if self.cuda else None,
                "cuda_peak_mb": round(self.cuda_peak, 1) if self.cuda else None,
                "model_storage": self.storage, "model_storage_unchanged": self.storage_same}

    def text(self) -> str:
        f = self.figures()
        out = f"RSS {f['rss_idle_mb']:.0f} MB idle, {f['rss_peak_mb']:.0f} MB peak (+{f['rss_peak_mb'] - f['rss_idle_mb']:.0f})"
        if self.cuda:
            out += f"; CUDA {f['cuda_idle_mb']:.0f} MB idle, {f['cuda_peak_mb']:.0f} MB peak"
        out += "; model weights: " + ("same storage, no copy" if f["model_storage_unchanged"] else "STORAGE CHANGED")
        return out
