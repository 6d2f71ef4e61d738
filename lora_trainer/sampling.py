"""Sample prompts (kohya's prompt-file syntax) and a small DDIM sampler over any host.

A prompt line: ``text --n negative --w 512 --h 512 --s 20 --l 7 --d 42`` (negative, width,
height, steps, CFG scale, seed). Lines starting with ``#`` are comments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    scale: float = 7.0
    seed: Optional[int] = None


def parse_prompts(spec: str, default_size=(512, 512)) -> List[SamplePrompt]:
    """``spec`` is a prompt file's path or the prompts themselves, one per line."""
    if not spec:
        return []
    p = Path(spec)
    text = p.read_text(encoding="utf-8") if "\n" not in spec and p.is_file() else spec
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--(?=[nwhsld]\s)", " " + line)
        sp = SamplePrompt(parts[0].strip(), width=default_size[0], height=default_size[1])
        for opt in parts[1:]:
            key, _, val = opt.partition(" ")
            val = val.strip()
            try:
                if key == "n":
                    sp.negative = val
                elif key == "w":
                    sp.width = int(val) // 8 * 8
                elif key == "h":
                    sp.height = int(val) // 8 * 8
                elif key == "s":
                    sp.steps = max(1, int(val))
                elif key == "l":
                    sp.scale = float(val)
                elif key == "d":
                    sp.seed = int(val)
            except ValueError:
                pass
        out.append(sp)
    return out


@torch.no_grad()
def ddim_sample(host, sp: SamplePrompt, *, max_token_length: int = 75, clip_skip: int = 1,
                default_seed: int = 0, autocast=None) -> torch.Tensor:
    """One image (3,H,W) in [-1,1] by deterministic DDIM with classifier-free guidance."""
    import contextlib
    ctx = autocast or contextlib.nullcontext()
    device = host.device
    seed = default_seed if sp.seed is None else sp.seed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, sp.height // 8, sp.width // 8), generator=g).to(device)
    with ctx:
        cond = host.encode_tokens(host.tokenize([sp.negative, sp.prompt], max_token_length), clip_skip)
    acp = host.alphas_cumprod.to(device)
    n = len(acp)
    ts = torch.linspace(n - 1, 0, sp.steps).round().long().tolist()
    for i, t in enumerate(ts):
        a_t = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        tt = torch.full((2,), t, device=device, dtype=torch.long)
        with ctx:
            out = host.denoise(torch.cat([x, x]), tt, cond).float()
        u, c = out.chunk(2)
        out = u + sp.scale * (c - u)
        if host.prediction_type == "v":
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return host.decode_latents(x)[0]


def to_pil(img: torch.Tensor):
    from PIL import Image
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
