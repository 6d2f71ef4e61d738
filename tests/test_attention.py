"""SDPA attention for the LDM host: the same outputs and gradients as ldm's einsum attention, restored
afterwards, and on the full-size SD1 UNet far less memory for a training step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.attention import sdpa_attention
from lora_trainer.networks.network import LoRANetwork

ROOT = Path(__file__).resolve().parents[1]


def test_sdpa_matches_ldm_attention_forward_and_backward(sd1_host):
    host = sd1_host
    host.prepare()
    try:
        net = LoRANetwork.create(host.unet, host.text_encoders, dim=4, alpha=4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        net.apply()
        z = torch.randn((2, 4, 8, 8), generator=g)
        t = torch.tensor([50, 600])
        cond = host.encode_tokens(host.tokenize(["trigger_a, red circle", "a blue square"], 75), 1)
        outs, grads = [], []
        for use in (False, True):
            with sdpa_attention(host.unet, use) as n:
                assert n == (12 if use else 0)   # 6 transformer blocks (2 in, 1 middle, 3 out) x attn1/attn2
                net.zero_grad()
                y = host.denoise(z, t, cond.detach())
                y.square().mean().backward()
            outs.append(y.detach())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        net.remove()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
        assert not any("forward" in m.__dict__ for m in host.unet.modules())   # put back
    finally:
        host.restore()


PROBE = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from lora_trainer.ldm_configs import known_config
from lora_trainer.ldm_host import instantiate, LDMHost
from lora_trainer.attention import sdpa_attention
from lora_trainer.networks.network import LoRANetwork
cfg = known_config("sd1")
unet_cfg = cfg["model"]["params"]["unet_config"]
from ldm.util import instantiate_from_config
from omegaconf import OmegaConf
unet = instantiate_from_config(OmegaConf.create(unet_cfg)).requires_grad_(False)
net = LoRANetwork.create(unet, [], dim=8, alpha=8)
net.apply()
z = torch.randn(1, 4, 64, 64); t = torch.tensor([500]); ctx = torch.randn(1, 77, 768)
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
with sdpa_attention(unet, sys.argv[1] == "sdpa") as n:
    y = unet(z, t, context=ctx)
    y.square().mean().backward()
print(json.dumps({"patched": n, "peak_extra_mb": rss() - base}))
"""


@pytest.mark.slow
def test_full_size_sd1_step_at_512_uses_far_less_memory_with_sdpa():
    """One LoRA training step of the real SD1 UNet architecture (random weights) at 512² (64² latents),
    each attention path in its own process: peak RSS above the built model."""
    pytest.importorskip("ldm")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    res = {}
    for mode in ("sdpa", "einsum"):
        r = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    print("full-size SD1 UNet, 512², LoRA step, peak extra RSS (MB):", {k: round(v["peak_extra_mb"]) for k, v in res.items()})
    assert res["sdpa"]["patched"] == 32 and res["einsum"]["patched"] == 0   # 16 transformer blocks x 2
    assert res["sdpa"]["peak_extra_mb"] < 0.5 * res["einsum"]["peak_extra_mb"], res
