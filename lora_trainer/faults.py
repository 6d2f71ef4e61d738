"""Fault injection, for tests of how a run ends when the machine fails it: CUDA out of memory, a full
disk, a NaN loss — without a GPU or a full disk. Off unless ``LORA_TRAINER_FAULT`` is set, e.g.
``oom@step=3`` (the 3rd training step runs out of memory), ``enospc@write=2`` (the 2nd file write finds
the disk full), ``nan@step=4`` (the 4th step's loss is NaN). Read when a run starts (``arm()``)."""
from __future__ import annotations

import errno
import os
from typing import Dict, Optional, Tuple

_armed: Dict[str, Tuple[str, int]] = {}
_counts: Dict[str, int] = {}


def arm(spec: Optional[str] = None) -> None:
    """(Re)read the fault spec (``kind@point=n``, comma-separated); counts start again."""
    _armed.clear()
    _counts.clear()
    spec = os.environ.get("LORA_TRAINER_FAULT", "") if spec is None else spec
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, rest = part.partition("@")
        point, _, n = rest.partition("=")
        _armed[point] = (kind, int(n or 1))


def hit(point: str) -> Optional[str]:
    """Count a pass through ``point``; the fault kind when this pass is the armed one."""
    if point not in _armed:
        return None
    _counts[point] = _counts.get(point, 0) + 1
    kind, n = _armed[point]
    return kind if _counts[point] == n else None


def maybe_raise(point: str) -> None:
    kind = hit(point)
    if kind == "oom":
        import torch
        error = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
        raise error("CUDA out of memory. Tried to allocate 2.00 GiB (injected by LORA_TRAINER_FAULT)")
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected by LORA_TRAINER_FAULT)")
