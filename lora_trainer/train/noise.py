"""DDPM noising from the model's own schedule, targets by prediction type, and loss weighting."""
from __future__ import annotations

from typing import Optional

import torch


def make_noise(latents: torch.Tensor, *, noise_offset: Optional[float] = None,
               multires_iterations: Optional[int] = None, multires_discount: float = 0.3,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device,
                                                   dtype=latents.dtype, generator=generator)
    if multires_iterations:
        b, c, h, w = latents.shape
        for i in range(multires_iterations):
            r = 2 ** (i + 1)
            sh, sw = max(1, h // r), max(1, w // r)
            extra = torch.randn((b, c, sh, sw), device=latents.device, dtype=latents.dtype, generator=generator)
            noise = noise + torch.nn.functional.interpolate(extra, size=(h, w), mode="bilinear") * multires_discount ** (i + 1)
            if sh == 1 or sw == 1:
                break
        noise = noise / noise.std()  # back to unit variance
    return noise


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    if prediction_type == "v":
        a = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    return noise


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps]
    return a / (1 - a)


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v."""
    s = snr(timesteps, alphas_cumprod)
    w = torch.clamp(s, max=gamma)
    return w / (s + 1) if prediction_type == "v" else w / s


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


# the last step's alpha-bar after the rescale: 0 exactly would make SNR 0 and min-SNR weights 0/0
# (the WebUI and sd-scripts both keep this tiny positive value there)
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"):
    shift and scale sqrt(alpha-bar) so the first step keeps its value and the last reaches zero."""
    s = alphas_cumprod.double().sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * (first / (first - last))
    out = s ** 2
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out.to(alphas_cumprod.dtype)
