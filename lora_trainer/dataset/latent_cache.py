"""Latent cache: each image encoded once by the host's VAE, in memory or on disk beside the images.

A disk entry is keyed by the image's bytes, its bucket and the VAE's fingerprint: a changed image,
resolution, bucket or VAE rebuilds it, and an unreadable or corrupt entry is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..io.atomic import atomic_write_bytes

log = logging.getLogger(__name__)
CACHE_DIR_NAME = ".lora_trainer_cache"
CACHE_VERSION = "1"


def cache_key(image_path: Path, bucket: Tuple[int, int], vae_fingerprint: str) -> str:
    try:
        data = Path(image_path).read_bytes()
    except OSError as e:
        from ..errors import DatasetError
        raise DatasetError(f"{image_path} cannot be read for the latent cache ({e.strerror or e}): it passed the "
                           "dataset check, so it changed since; fix or remove it and start the run again.") from None
    h = hashlib.sha256(data).hexdigest()[:20]
    return f"v{CACHE_VERSION}-{h}-{bucket[0]}x{bucket[1]}-{vae_fingerprint}"


def cache_path(image_path: Path) -> Path:
    image_path = Path(image_path)
    return image_path.parent / CACHE_DIR_NAME / (image_path.name + ".safetensors")


def load_cached(image_path: Path, key: str, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    p = cache_path(image_path)
    if not p.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            t = f.get_tensor("latent")
        if tuple(t.shape) != tuple(shape) or not torch.isfinite(t).all():
            raise ValueError("bad shape or values")
        return t
    except Exception as e:  # corrupt or foreign file: rebuild
        log.warning("latent cache %s is unreadable (%s); rebuilding it", p, e)
        return None


def store_cached(image_path: Path, key: str, latent: torch.Tensor) -> None:
    from safetensors.torch import save
    data = save({"latent": latent.detach().float().cpu().contiguous()}, metadata={"key": key})
    atomic_write_bytes(cache_path(image_path), data)
