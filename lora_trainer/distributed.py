"""Data-parallel training over several processes (one per GPU), for the standalone CLI:
``accelerate launch --num_processes N -m lora_trainer train --config cfg.toml``.

accelerate starts the processes and sets up the process group (NCCL on GPUs, gloo on CPUs); each
process trains on its own share of every epoch's batches (the epoch's order is the same everywhere, so
the shares never overlap), the LoRA gradients are averaged across processes before each optimizer step,
so every process holds the same network; only the main process writes files. A single process (no
launcher) is ``Dist()``: rank 0 of 1, and nothing here does anything.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """The launcher's process group (``WORLD_SIZE`` > 1), else a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from .errors import UserError
        try:
            from accelerate import PartialState
        except ImportError:
            raise UserError("Several processes were launched, but accelerate is not installed: "
                            "pip install accelerate (or run a single process).") from None
        state = PartialState()
        return cls(rank=state.process_index, world=state.num_processes, device=state.device)

    # ------------------------------------------------------------ data
    def shard(self, items: Sequence[T]) -> List[T]:
        """This process's share: every world-th item from its rank, the last ones wrapped around so every
        process gets the same count (the gradient average needs every process at every step)."""
        if not self.active or not items:
            return list(items)
        per = math.ceil(len(items) / self.world)
        return [items[(self.rank + i * self.world) % len(items)] for i in range(per)]

    def share_count(self, n: int) -> int:
        return math.ceil(n / self.world) if self.active else n

    # ------------------------------------------------------------ gradients
    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        import torch.distributed as td
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        td.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td
            td.barrier()
