"""What the WebUI host refuses before any work, with the reason and the fix: the refusal rules read
only the loaded model's type flags and modules and the WebUI's command-line options, so they run here
on tiny real modules, with a minimal stand-in for the WebUI's ``modules.shared`` / ``modules.devices``
(the real WebUI runs them in tests/webui)."""
from __future__ import annotations

import sys
import types

import pytest
import torch.nn as nn

from lora_trainer.errors import UserError


@pytest.fixture()
def webui_modules(monkeypatch):
    pkg = types.ModuleType("modules")
    shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lowvram=False, medvram=False),
                                   opts=types.SimpleNamespace(fp8_storage="Disable"))
    devices = types.SimpleNamespace(fp8=False)
    pkg.shared, pkg.devices = shared, devices
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setitem(sys.modules, "modules.devices", devices)
    return shared


class _Embedder(nn.Module):
    def __init__(self, key, wrapped=True):
        super().__init__()
        self.input_key = key
        if wrapped:
            self.wrapped = nn.Linear(2, 2)


def _model(**kw):
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(kw.pop("in_channels", 4), 8, 3)])])
    m = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet), cond_stage_model=object(), **kw)
    return m


def test_kinds_and_refusals(webui_modules):
    from lora_trainer.webui.host import _refuse_unsupported
    assert _refuse_unsupported(_model()) == "sd1"
    assert _refuse_unsupported(_model(is_sd2=True)) == "sd2"
    base = types.SimpleNamespace(embedders=[_Embedder("txt"), _Embedder("txt"), _Embedder("original_size_as_tuple", False)])
    assert _refuse_unsupported(_model(is_sdxl=True, conditioner=base)) == "sdxl"
    refiner = types.SimpleNamespace(embedders=[_Embedder("txt"), _Embedder("aesthetic_score", False)])
    with pytest.raises(UserError, match="refiner.*SDXL base"):
        _refuse_unsupported(_model(is_sdxl=True, conditioner=refiner))
    with pytest.raises(UserError, match="inpainting.*non-inpainting"):
        _refuse_unsupported(_model(in_channels=9))
    with pytest.raises(UserError, match="inpainting"):
        _refuse_unsupported(_model(is_sdxl=True, is_sdxl_inpaint=True, conditioner=base))
    with pytest.raises(UserError, match="SD3.*SD1, SD2 or SDXL"):
        _refuse_unsupported(_model(is_sd3=True))
    with pytest.raises(UserError, match="No model is loaded"):
        _refuse_unsupported(None)
    webui_modules.cmd_opts.lowvram = True
    with pytest.raises(UserError, match="--lowvram"):
        _refuse_unsupported(_model(is_sdxl=True, conditioner=base))
    webui_modules.cmd_opts.lowvram = False
    webui_modules.opts.fp8_storage = "Enable for SDXL"
    with pytest.raises(UserError, match="FP8"):
        _refuse_unsupported(_model(is_sdxl=True, conditioner=base))
