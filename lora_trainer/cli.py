"""Command line: ``python -m lora_trainer <command>``.

- ``train --config cfg.toml [--set key=value ...] [--resume [STATE]]``: train on a checkpoint file (+ its
  yaml); ``--resume`` continues the run from its training state.
- ``demo [--out DIR] [--model sd1|sdxl] [--set key=value ...]``: a tiny random SD1 (or SDXL) model and a
  synthetic dataset, built on the fly, trained 3 epochs on the CPU; leaves the model, dataset and
  config.toml in DIR.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

from .config import TrainConfig
from .errors import ConfigError, UserError

log = logging.getLogger("lora_trainer")


def _quiet_libraries() -> None:
    """Keep third-party deprecation chatter (ldm, lightning, timm) out of the CLI's output."""
    for cat in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
    try:
        from pytorch_lightning.utilities.warnings import LightningDeprecationWarning  # noqa: F401
        warnings.filterwarnings("ignore", category=LightningDeprecationWarning)
    except Exception:
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # bitsandbytes (imported by diffusers when installed) warns about optional CPU kernels on import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _print_progress(p) -> None:
    if p.phase == "training" and p.loss is not None and p.step:
        eta = f", eta {p.eta:.0f}s" if p.eta is not None else ""
        print(f"  epoch {p.epoch}/{p.total_epochs} step {p.step}/{p.total_steps} loss {p.loss:.4f}{eta}", flush=True)


def cmd_train(args) -> int:
    from .ldm_host import load_checkpoint
    cfg = TrainConfig.load(args.config).with_overrides(args.set or [])
    if args.resume:
        cfg = cfg.replace(resume=args.resume)
    _report_unknown(cfg)
    cfg.validate()
    if not cfg.pretrained_model_name_or_path:
        raise UserError("pretrained_model_name_or_path is empty: the CLI trains on a checkpoint file; set it in "
                        "the config or with --set pretrained_model_name_or_path=PATH.")
    from .distributed import Dist
    dist = Dist.from_env()   # `accelerate launch --num_processes N`: one process per device
    device = str(dist.device) if dist.active else args.device
    host = load_checkpoint(cfg.pretrained_model_name_or_path, cfg.model_config, device=device, vae=cfg.vae,
                           v_parameterization=cfg.v_parameterization, zero_terminal_snr=cfg.zero_terminal_snr)
    return _train_and_report(cfg, host, args.verbose, dist=dist)


def _train_and_report(cfg: TrainConfig, host, verbose: bool, validation=None, dist=None) -> int:
    """Train, printing the dataset summary first, then each epoch's mean loss and each file as it lands
    (the main process only, when several train together)."""
    from .run import build_data, train
    from .train.progress import Callbacks
    main = dist is None or dist.is_main
    if main:
        for line in build_data(cfg).scan.summary_lines():
            print(f"dataset: {line}", flush=True)
        if dist is not None and dist.active:
            print(f"data parallel: {dist.world} processes, each on its share of every epoch", flush=True)
    shown = [0]

    def on_progress(p) -> None:
        if not main:
            return
        if verbose:
            _print_progress(p)
        for e, loss in p.epoch_losses[shown[0]:]:
            print(f"epoch {e}: mean loss {loss:.5f}", flush=True)
        shown[0] = len(p.epoch_losses)

    result = train(cfg, host, callbacks=Callbacks(on_progress),
                   on_saved=lambda path, meta: print(f"saved {path}", flush=True),
                   before_restore=validation.after if validation else None, dist=dist)
    if not main:
        return 0
    for s in result.samples:
        print(f"sample {s}")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.stopped:
        print("stopped before the end; the epochs saved above are kept")
    return 0


def _report_unknown(cfg: TrainConfig) -> None:
    if cfg.unknown:
        print("note: these config keys are not used by this trainer and are kept as they are: "
              + ", ".join(sorted(cfg.unknown)), file=sys.stderr)


class _Validation:
    """Fixed-seed validation loss of the demo: measured before training and, with the trained network
    still applied, after it."""

    def __init__(self, host, cfg: TrainConfig):
        from .run import build_data
        self.host, self.cfg = host, cfg
        data = build_data(cfg)
        data.cache_latents(host.encode_images, "", False)
        self.latents = data.latents
        self.captions = [it.caption for it in data.items]
        self.before = self._measure(None)
        self.after_value: Optional[float] = None

    def _measure(self, network) -> float:
        from .train.validation import validation_loss
        return validation_loss(self.host, self.latents, self.captions, max_token_length=self.cfg.max_token_length,
                               clip_skip=self.cfg.clip_skip, network=network)

    def after(self, network) -> None:
        self.after_value = self._measure(network)


def demo_config(out: Path, model: str = "sd1") -> TrainConfig:
    cfg = TrainConfig(
        train_data_dir=str(out / "dataset"), output_dir=str(out / "output"), output_name="demo",
        pretrained_model_name_or_path=str(out / "model" / f"tiny-{model}.safetensors"),
        resolution="64", enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64,
        network_dim=8, network_alpha=8.0, learning_rate=1e-3, text_encoder_lr=5e-4, optimizer_type="AdamW",
        lr_scheduler="constant", max_train_epochs=3, train_batch_size=2, mixed_precision="no",
        save_precision="fp16", max_token_length=75, clip_skip=1, seed=42, keep_tokens=1,
        logging_dir=str(out / "logs"), log_prefix="demo-",
        sample_prompts="trigger_a, red circle --w 64 --h 64 --s 8 --l 5 --d 1", sample_every_n_epochs=3)
    if model == "sdxl":   # the SDXL presets' way: UNet only, text-encoder outputs cached, LoCon
        cfg = cfg.replace(network_train_unet_only=True, cache_text_encoder_outputs=True, learning_rate=2e-3,
                          network_args=["conv_dim=8", "conv_alpha=8"])
    return cfg


def cmd_demo(args) -> int:
    from . import tiny
    from .ldm_host import load_checkpoint
    t0 = time.time()
    out = Path(args.out).resolve()
    print(f"building a tiny random {args.model.upper()} model and a synthetic dataset in {out}", flush=True)
    model_dir = out / "model"
    ckpt = model_dir / f"tiny-{args.model}.safetensors"
    if not ckpt.is_file():
        if args.model == "sdxl":
            tiny.save_sdxl_checkpoint(model_dir, "tiny-sdxl", seed=0)
        else:
            tiny.save_checkpoint(tiny.build_model("sd1", model_dir, seed=0), model_dir, "sd1")
    if not (out / "dataset").is_dir():
        tiny.make_dataset(out / "dataset")
    cfg = demo_config(out, args.model)
    cfg.save(out / "config.toml")
    cfg = cfg.with_overrides(args.set or [])
    cfg.validate()
    host = load_checkpoint(str(ckpt), device=args.device)
    validation = _Validation(host, cfg)
    print(f"training {cfg.max_train_epochs} epochs on {args.device} (rerun: python -m lora_trainer train "
          f"--config {out / 'config.toml'})", flush=True)
    rc = _train_and_report(cfg, host, args.verbose, validation)
    print(f"validation loss: {validation.before:.5f} -> {validation.after_value:.5f}")
    print(f"done in {time.time() - t0:.1f}s")
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="Train kohya-compatible LoRAs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every progress update")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on a checkpoint file as a TOML config says")
    p.add_argument("--config", required=True, help="TOML config (sd-scripts names)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (TOML syntax)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="STATE",
                   help="continue from the run's training state (default: <output_dir>/<output_name>.trainstate)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="train a tiny random model on a synthetic dataset (CPU, under a minute)")
    p.add_argument("--out", default="demo_out", help="folder for the model, dataset, config and outputs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (TOML syntax)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=("sd1", "sdxl"), default="sd1",
                   help="the tiny model's architecture (sdxl: the sgm checkpoint layout, diffusers' UNet)")
    p.set_defaults(func=cmd_demo)
    from .post.cli import add_post_commands
    add_post_commands(sub)
    from .lr_plot import add_lr_plot_command
    add_lr_plot_command(sub)
    from .bench import add_bench_command
    add_bench_command(sub)
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False
