"""What install.py installs into the WebUI's environment, and the constraints that keep every package
the WebUI pins exactly where it is. Pure data and functions: testable without a WebUI."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, List, Optional

# packages whose installed version must never move (the WebUI pins them; moving one breaks it)
HOST_PINNED = ["torch", "torchvision", "protobuf", "numpy", "transformers", "accelerate", "safetensors", "gradio",
               "gradio_client", "pydantic", "fastapi", "Pillow", "open-clip-torch", "pytorch_lightning", "tokenizers",
               "huggingface_hub", "setuptools", "starlette", "httpx", "xformers"]


def _major_minor(version: Optional[str]) -> tuple:
    if not version:
        return (0, 0)
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return (0, 0)


@dataclass
class Requirement:
    dist: str                                   # distribution name to look up
    spec: Callable[[Callable[[str], Optional[str]]], str]   # what pip installs, given installed versions
    why: str
    condition: Optional[Callable[[], bool]] = None

    def needed(self) -> bool:
        return self.condition() if self.condition else True


def _lycoris(v) -> str:  # 4.1.x fails to import on torch < 2.4 (research/libs.md §3.7)
    return "lycoris-lora==4.0.0" if _major_minor(v("torch")) < (2, 4) else "lycoris-lora>=4.1,<5"


def _bitsandbytes(v) -> str:  # newer releases need a newer torch; 8-bit on CPU from 0.50
    t = _major_minor(v("torch"))
    bound = "<=0.45.5" if t < (2, 2) else "<0.48" if t < (2, 3) else "<0.50" if t < (2, 4) else "<0.51"
    return "bitsandbytes" + bound


def _tensorboard(v) -> str:
    return "tensorboard<2.21" if _major_minor(v("protobuf")) < (4, 0) else "tensorboard"


REQUIREMENTS: List[Requirement] = [
    Requirement("tomli", lambda v: "tomli>=2.0", "reads TOML configs on Python < 3.11",
                lambda: sys.version_info < (3, 11)),
    Requirement("tensorboard", _tensorboard, "loss curves (logging_dir)"),
    Requirement("prodigyopt", lambda v: "prodigyopt>=1.0", "optimizer_type = Prodigy"),
    Requirement("dadaptation", lambda v: "dadaptation>=3.1", "optimizer_type = DAdapt*"),
    Requirement("lion-pytorch", lambda v: "lion-pytorch>=0.1.2", "optimizer_type = Lion"),
    Requirement("schedulefree", lambda v: "schedulefree", "optimizer_type = AdamWScheduleFree etc."),
    Requirement("lycoris-lora", _lycoris, "network_module = lycoris.kohya (LoCon, LoHa, LoKr, ...)"),
    Requirement("bitsandbytes", _bitsandbytes, "optimizer_type = AdamW8bit, Lion8bit, ..."),
]


def installed_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def missing(is_installed: Callable[[str], bool] = lambda d: installed_version(d) is not None) -> List[Requirement]:
    return [r for r in REQUIREMENTS if r.needed() and not is_installed(r.dist)]


def constraints_text(version_of: Callable[[str], Optional[str]] = installed_version) -> str:
    """``name==version`` for every host-pinned package that is installed (local builds keep their +suffix)."""
    lines = []
    for dist in HOST_PINNED:
        v = version_of(dist)
        if v:
            lines.append(f"{dist}=={v}")
    return "\n".join(lines) + "\n"
