"""``torch_compile`` (sd-scripts' name, with ``dynamo_backend``): the UNet's forward compiled with
torch.compile for the run (the standalone hosts; the WebUI's shared model is left as it is), put back
afterwards. The LoRA patches are inside the compiled region (they are the layers' forwards). Off by
default: compiling takes minutes, and its gain depends on the GPU (measure with ``bench``)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def compiled_forward(module: nn.Module, enabled: bool, backend: str = "inductor") -> Iterator[bool]:
    if not enabled:
        yield False
        return
    import torch
    had = module.__dict__.get("forward")
    module.forward = torch.compile(module.forward, backend=backend)
    try:
        yield True
    finally:
        if had is not None:
            module.forward = had
        else:
            module.__dict__.pop("forward", None)
