"""Reading and writing LoRA safetensors files (kohya key layout + string metadata)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..errors import UserError
from .atomic import atomic_write_bytes
from .hashes import model_hashes

SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteWeights(UserError):
    pass


def check_finite(tensors: Dict[str, torch.Tensor]) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeights(
            f"{len(bad)} tensors contain NaN/Inf (e.g. {bad[0]}): training diverged. Nothing was saved from this "
            "state. Lower the learning rate (or use bf16 instead of fp16) and train again.")


def zero_tensors(tensors: Dict[str, torch.Tensor]) -> list:
    return [k for k, t in tensors.items() if t.numel() > 1 and t.is_floating_point() and not bool(t.abs().max() > 0)]


def serialize(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_lora(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
              save_precision: str = "fp16") -> Dict[str, str]:
    """Cast, check, hash and write atomically. Returns the metadata as written (with sshs_* hashes)."""
    dtype = SAVE_DTYPES[save_precision]
    # a copy per tensor: safetensors refuses tensors that share storage (views, or a cast that was a no-op)
    out = {k: (v.detach().float().to(dtype) if v.is_floating_point() else v.detach()).clone() for k, v in tensors.items()}
    check_finite(out)  # a cast to fp16 can overflow too
    meta = {k: str(v) for k, v in metadata.items() if v is not None}
    # the addnet hash covers tensor bytes only, so it stays valid once the hashes join the metadata
    model_hash, legacy_hash = model_hashes(serialize(out, meta))
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    atomic_write_bytes(Path(path), serialize(out, meta))
    return meta


def read_header(path: Path) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """The tensor index and metadata of a safetensors file, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path.name} is not a safetensors file (too short).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise UserError(f"{path.name} is not a safetensors file or is truncated (header of {n} bytes).")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path.name} is not a safetensors file (its header is not JSON).") from None
    meta = header.pop("__metadata__", {}) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path.name} is truncated: {size} bytes on disk, {8 + n + end} expected. Copy it again.")
    return header, meta


def load_lora(path: Path, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    _, meta = read_header(path)
    from safetensors.torch import load_file
    return load_file(str(path), device=device), meta


def read_metadata(path: Path) -> Optional[Dict[str, str]]:
    return read_header(path)[1]
