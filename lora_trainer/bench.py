"""``python -m lora_trainer bench``: our training step against a plain reference step, in one process.

The case is what the SDXL/SD1 presets train: UNet only, latents and text-encoder outputs cached (so the
step is the UNet's forward and backward), a rank-``dim`` LoRA on the transformer layers, AdamW. The
reference is a deliberately plain hand-written step on the same model: its own LoRA (forward hooks on
the same layers, same rank and scale), ``mse(pred, noise)``, backward, ``torch.optim.AdamW`` with its
defaults. Ours is the run's step (``train_step`` + ``optimizer_step``: min-SNR weighting, clipping,
device-side loss bookkeeping, the optimizer as the optimizer registry builds it). Same attention kernel
(SDPA) and precision for both. Warm-up steps are excluded; the two are interleaved so machine noise
falls on both. One JSON line per case: impl, model, resolution, batch, it_per_s, images_per_s,
peak_mem_mb, ratio (ours / reference).

Models: ``tiny`` (seconds on a CPU), random-weight full-size ``sd15`` and ``sdxl`` (random weights
time the same as real ones and cost nothing to download).
"""
from __future__ import annotations

import json
import time
from typing import Dict, List

import torch
import torch.nn as nn


class _UNetOnly:
    """The host surface a UNet-only step needs: a UNet, its schedule, the prediction type."""
    prediction_type = "epsilon"

    def __init__(self, unet, kind: str, device):
        from .sdxl_host import sdxl_alphas_cumprod
        self.unet, self.model_kind, self.device = unet, kind, torch.device(device)
        self.alphas_cumprod = sdxl_alphas_cumprod().to(self.device)   # SD1 and SDXL share this schedule

    def denoise(self, x, t, cond):
        if self.model_kind == "sdxl":
            return self.unet(x, t, cond["crossattn"], cond["pooled"], cond["time_ids"])
        return self.unet(x, t, context=cond)


def build(model: str, device: str):
    """(host, context width, pooled width) with random weights."""
    torch.manual_seed(0)
    if model == "sdxl":
        from .sdxl_unet import SDXL_BASE_UNET, build_unet
        return _UNetOnly(build_unet(SDXL_BASE_UNET, device).requires_grad_(False), "sdxl", device), 2048, 1280
    if model == "tiny-sdxl":
        from .sdxl_unet import build_unet
        from .tiny import SDXL_UNET
        return _UNetOnly(build_unet(SDXL_UNET, device).requires_grad_(False), "sdxl", device), 64, 32
    from omegaconf import OmegaConf
    from .ldm_host import fix_pytorch_lightning
    fix_pytorch_lightning()
    from ldm.util import instantiate_from_config
    if model == "sd15":
        from .ldm_configs import known_config
        cfg, ctx = known_config("sd1")["model"]["params"]["unet_config"], 768
    else:
        from .tiny import model_config
        cfg, ctx = model_config("sd1")["model"]["params"]["unet_config"], 32
    cfg = dict(cfg, params=dict(cfg["params"], use_checkpoint=False))
    unet = instantiate_from_config(OmegaConf.create(cfg)).to(device).requires_grad_(False)
    return _UNetOnly(unet, "sd1", device), ctx, 0


class _PlainLoRA:
    """The reference LoRA: down/up Linear pairs applied by forward hooks, nothing else."""

    def __init__(self, targets, dim: int, alpha: float, device):
        self.params: List[nn.Parameter] = []
        self.hooks = []
        for t in targets:
            m = t.module
            if isinstance(m, nn.Conv2d):   # SD1's 1x1 proj_in/proj_out
                down = nn.Conv2d(m.in_channels, dim, 1, bias=False).to(device)
                up = nn.Conv2d(dim, m.out_channels, 1, bias=False).to(device)
            else:
                down = nn.Linear(m.in_features, dim, bias=False).to(device)
                up = nn.Linear(dim, m.out_features, bias=False).to(device)
            nn.init.zeros_(up.weight)
            scale = alpha / dim
            self.params += [down.weight, up.weight]
            self.hooks.append(m.register_forward_hook(
                lambda mod, inp, out, d=down, u=up, s=scale: out + u(d(inp[0])) * s))

    def remove(self):
        for h in self.hooks:
            h.remove()


def run_case(model: str, resolution: int, batch: int, *, device: str, precision: str = "bf16", dim: int = 32,
             steps: int = 10, warmup: int = 3, rounds: int = 2) -> List[Dict]:
    from .networks.naming import unet_targets
    from .networks.network import LoRANetwork
    from .train.loop import StepSettings, optimizer_step, train_step
    from .train.precision import Precision
    host, ctx, pooled = build(model, device)
    prec = Precision(precision, host.device)
    lat = resolution // 8
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, 4, lat, lat, generator=g).to(device)
    if host.model_kind == "sdxl":
        cond = {"crossattn": torch.randn(batch, 77, ctx, generator=g).to(device),
                "pooled": torch.randn(batch, pooled, generator=g).to(device),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                         dtype=torch.float32, device=device)}
    else:
        cond = torch.randn(batch, 77, ctx, generator=g).to(device)
    style = "ldm" if host.model_kind == "sdxl" else "diffusers"
    targets = unet_targets(host.unet, include_conv_blocks=False, style=style)

    # ours: the run's network, step and optimizer
    net = LoRANetwork.create(host.unet, [], dim=dim, alpha=dim, unet_key_style=style).to(device)
    params = [p for g_ in net.param_groups(1e-4, 1e-4, True, False) for p in g_["params"]]
    opt = _adamw(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    settings = StepSettings(min_snr_gamma=5.0, train_text_encoder=False)

    def ours():
        train_step(host, prec, settings, z, cond=cond)
        optimizer_step(net, opt, sched, prec, params, settings)

    # reference: plain LoRA hooks, mse(pred, noise), backward, AdamW
    ref_lora = None
    ref_opt = None

    def reference():
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (batch,), device=z.device)
        a = host.alphas_cumprod[t].view(-1, 1, 1, 1)
        with prec.autocast():
            pred = host.denoise(a.sqrt() * z + (1 - a).sqrt() * noise, t, cond)
        loss = nn.functional.mse_loss(pred.float(), noise.float())
        prec.backward(loss)
        prec.step(ref_opt)
        ref_opt.zero_grad(set_to_none=True)

    results = {"ours": [], "reference": []}
    peaks = {"ours": 0.0, "reference": 0.0}
    for _ in range(rounds):
        for impl in ("ours", "reference"):
            if impl == "ours":
                net.apply()
                fn = ours
            else:
                ref_lora = _PlainLoRA(targets, dim, dim, device)
                ref_opt = torch.optim.AdamW(ref_lora.params, lr=1e-4)
                fn = reference
            try:
                secs, peak = _timed(fn, steps, warmup, device)
            finally:
                if impl == "ours":
                    net.remove()
                else:
                    ref_lora.remove()
            results[impl].append(secs)
            peaks[impl] = max(peaks[impl], peak)
    out = []
    best = {k: min(v) for k, v in results.items()}
    for impl in ("ours", "reference"):
        it_s = 1.0 / best[impl]
        out.append({"impl": impl, "model": model, "resolution": resolution, "batch": batch, "device": device,
                    "precision": precision, "it_per_s": round(it_s, 3), "images_per_s": round(it_s * batch, 3),
                    "peak_mem_mb": round(peaks[impl], 1),
                    "ratio": round(best["reference"] / best[impl], 3) if impl == "ours" else 1.0})
    return out


def _adamw(params):
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=params[0].is_cuda)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4)


def _timed(fn, steps: int, warmup: int, device: str):
    import resource
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return secs, peak


DEFAULT_CASES = {"tiny": [(64, 2)], "tiny-sdxl": [(64, 2)], "sd15": [(512, 1), (512, 4), (512, 8)],
                 "sdxl": [(1024, 1), (1024, 4)]}


def add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="time our training step against a plain reference step (JSON lines)")
    p.add_argument("--model", action="append", choices=list(DEFAULT_CASES),
                   help="tiny (CPU, seconds), tiny-sdxl, sd15, sdxl (random full-size weights); repeatable")
    p.add_argument("--resolution", type=int, help="override the model's default resolution")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, help="no, fp16 or bf16 (default: bf16 on CUDA, no on the CPU)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "no")
    for model in args.model or ["tiny"]:
        cases = DEFAULT_CASES[model]
        if args.resolution or args.batch:
            res = args.resolution or cases[0][0]
            cases = [(res, b) for b in (args.batch or [cases[0][1]])]
        for res, batch in cases:
            for line in run_case(model, res, batch, device=args.device, precision=precision, dim=args.dim,
                                 steps=args.steps, warmup=args.warmup):
                print(json.dumps(line), flush=True)
    return 0
