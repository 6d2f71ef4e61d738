"""Hashes the WebUI and kohya tools read from a LoRA file.

- ``sshs_model_hash`` ("addnet hash"): SHA-256 of the file's bytes after the safetensors header,
  i.e. of the tensor data only. The WebUI uses it as the file's hash when present.
- ``sshs_legacy_hash``: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex characters.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Tuple


def addnet_hash_bytes(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


def legacy_hash_bytes(data: bytes) -> str:
    return hashlib.sha256(memoryview(data)[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def addnet_hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hashes(data: bytes) -> Tuple[str, str]:
    return addnet_hash_bytes(data), legacy_hash_bytes(data)
