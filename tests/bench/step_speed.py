"""Step-time benchmark: our LoRA training step against a reference step on the same model, in one run.

Reference: ldm's own training path (``LatentDiffusion.p_losses`` + backward + AdamW) on the same
latents, conditioning and timesteps, training the same LoRA parameters with our patches applied — so the
ratio isolates the cost of our step (noise, targets, min-SNR, precision, accumulation, clipping,
device-side loss bookkeeping) from the model's own cost. Reports ratios (ours / reference), never
absolute targets. Runs on CPU (tiny model) or CUDA if present.

    .venv/bin/python tests/bench/step_speed.py [--steps 30] [--kind sd1|sd2-v] [--device cpu|cuda]
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    import torch
    from lora_trainer import tiny
    from lora_trainer.networks.network import LoRANetwork
    from lora_trainer.train.loop import StepSettings, optimizer_step, train_step
    from lora_trainer.train.precision import Precision

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kind", default="sd1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    host = tiny.host(args.kind, Path("/tmp/lora_trainer_bench"))
    host.model.to(args.device)
    host.device = torch.device(args.device)
    host.alphas_cumprod = host.alphas_cumprod.to(args.device)
    host.prepare()
    net = LoRANetwork.create(host.unet, host.text_encoders, dim=8, alpha=8).to(args.device)
    net.apply()
    params = [p for g in net.param_groups(1e-4, 1e-4) for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    prec = Precision("no", host.device)
    s = StepSettings(min_snr_gamma=5.0, max_token_length=75)
    z = torch.randn(args.batch, 4, 8, 8, device=args.device)
    tokens = host.tokenize(["trigger_a, red circle"] * args.batch, 75)

    def ours():
        loss = train_step(host, prec, s, z, tokens)
        optimizer_step(net, opt, sched, prec, params, s)
        return loss

    def reference():
        cond = host.encode_tokens(tokens, 1)
        t = torch.randint(0, 1000, (args.batch,), device=args.device)
        loss, _ = host.model.p_losses(z, cond, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(fn):
        for _ in range(3):
            fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    # interleave to share the machine's noise between both
    a, b = [], []
    for _ in range(3):
        a.append(timed(ours))
        b.append(timed(reference))
    ours_t, ref_t = min(a), min(b)
    host.restore()
    print(f"model tiny-{args.kind}, device {args.device}, batch {args.batch}, {args.steps} steps x 3 rounds")
    print(f"ours      {ours_t * 1000:8.2f} ms/step")
    print(f"reference {ref_t * 1000:8.2f} ms/step (ldm p_losses + AdamW, same LoRA)")
    print(f"ratio ours/reference: {ours_t / ref_t:.3f}")


if __name__ == "__main__":
    main()
