"""A fixed-seed validation loss: the same latents, captions, timesteps and noise every call, so
"before" and "after" training are comparable (the raw step loss is far too noisy for that)."""
from __future__ import annotations

from typing import List

import torch

from .noise import add_noise, per_sample_mse, target_for


@torch.no_grad()
def validation_loss(host, latents: List[torch.Tensor], captions: List[str], *, max_token_length: int = 75,
                    clip_skip: int = 1, seed: int = 1234, timesteps_per_item: int = 4, network=None) -> float:
    was_training = network.training if network is not None else False
    if network is not None:
        network.eval()
    try:
        g = torch.Generator().manual_seed(seed)
        acp = host.alphas_cumprod
        n = len(acp)
        total, count = 0.0, 0
        ts = torch.linspace(n * 0.1, n * 0.9, timesteps_per_item).long()
        for z, cap in zip(latents, captions):
            z = z.unsqueeze(0).to(host.device).repeat(len(ts), 1, 1, 1)
            noise = torch.randn(z.shape, generator=g).to(host.device)
            t = ts.to(host.device)
            cond = host.encode_tokens(host.tokenize([cap] * len(ts), max_token_length), clip_skip)
            pred = host.denoise(add_noise(z, noise, t, acp), t, cond)
            total += per_sample_mse(pred, target_for(host.prediction_type, z, noise, t, acp)).sum().item()
            count += len(ts)
        return total / max(1, count)
    finally:
        if network is not None and was_training:
            network.train()
