"""What install.py installs into the WebUI's environment, and the constraints that keep every package
the WebUI pins exactly where it is. Pure data and functions: testable without a WebUI."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Dict, List, Optional

# packages whose installed version must never move (the WebUI pins them; moving one breaks it)
HOST_PINNED = ["torch", "torchvision", "protobuf", "numpy", "transformers", "accelerate", "safetensors", "gradio",
               "gradio_client", "pydantic", "fastapi", "Pillow", "open-clip-torch", "pytorch_lightning", "tokenizers",
               "huggingface_hub", "setuptools", "starlette", "httpx", "xformers"]


@dataclass
class Requirement:
    dist: str                 # distribution name to look up
    spec: str                 # what pip installs
    why: str
    condition: Optional[Callable[[], bool]] = None

    def needed(self) -> bool:
        return self.condition() if self.condition else True


REQUIREMENTS: List[Requirement] = [
    Requirement("tomli", "tomli>=2.0", "reads TOML configs on Python < 3.11", lambda: sys.version_info < (3, 11)),
    Requirement("tensorboard", "tensorboard", "loss curves (logging_dir)"),
    Requirement("prodigyopt", "prodigyopt>=1.0", "optimizer_type = Prodigy"),
    Requirement("dadaptation", "dadaptation>=3.1", "optimizer_type = DAdapt*"),
    Requirement("lion-pytorch", "lion-pytorch>=0.1.2", "optimizer_type = Lion"),
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
