"""The learning-rate curve of a config before training: the values (:func:`curve_for_config`) and a
PNG drawn with PIL (:func:`render_png`; matplotlib is not needed). ``python -m lora_trainer lr-plot
--config cfg.toml --out lr.png`` writes it; the tab shows the same picture."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .config import TrainConfig
from .errors import ConfigError, UserError

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def total_steps_for(cfg: TrainConfig) -> int:
    """Optimizer steps of the run: from the dataset when it is there, else max_train_steps."""
    if cfg.train_data_dir and Path(cfg.train_data_dir).is_dir():
        from .run import build_data, plan
        return plan(cfg, build_data(cfg)).total_steps
    if cfg.max_train_steps:
        return int(cfg.max_train_steps)
    raise UserError("The number of steps depends on the dataset: set train_data_dir to your dataset (or "
                    "max_train_steps) to plot the learning rate.")


def curve_for_config(cfg: TrainConfig, total_steps: Optional[int] = None) -> Dict[str, List[float]]:
    """{"textencoder": [lr at step 0, 1, ...], "unet": [...]} for the groups this config trains."""
    from .optim import lr_curve, setting_problems, warmup_steps
    total = int(total_steps or total_steps_for(cfg))
    if total < 1:
        raise UserError("This run has no steps: raise max_train_epochs or max_train_steps.")
    problems = setting_problems(cfg, "cpu", total)
    if problems:
        raise ConfigError(problems)
    return lr_curve(cfg, total, warmup_steps(cfg.lr_warmup_steps, total))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-6:
        ticks.append(round(v, 12))
        v += step
    return ticks


def render_png(curves: Dict[str, List[float]], path: Optional[Path] = None, *, size: Tuple[int, int] = (720, 360),
               title: str = "learning rate"):
    """Draw the curves (x = step, y = lr) with PIL; returns the image, and writes it when ``path`` is given."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 78, 16, 28, 40
    pw, ph = w - left - right, h - top - bottom
    values = [v for c in curves.values() for v in c]
    n = max((len(c) for c in curves.values()), default=1)
    ymax = max(values) if values else 1.0
    ymax = ymax if ymax > 0 else 1.0
    yticks = _nice_ticks(0.0, ymax)
    ytop = max(yticks[-1], ymax)
    xticks = [t for t in _nice_ticks(0, max(1, n - 1)) if float(t).is_integer()]

    def xy(i: float, v: float) -> Tuple[float, float]:
        return left + pw * (i / max(1, n - 1)), top + ph * (1 - v / ytop)

    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for t in yticks:
        _, y = xy(0, t)
        d.line([left, y, left + pw, y], fill=(230, 230, 230))
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.text((4, y - 6), f"{t:.3g}", fill=(0, 0, 0), font=font)
    for t in xticks:
        x, _ = xy(t, 0)
        d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
        d.text((x - 10, top + ph + 8), str(int(t)), fill=(0, 0, 0), font=font)
    d.text((left + pw // 2 - 12, h - 16), "step", fill=(0, 0, 0), font=font)
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    lx = left + pw - 150
    for k, (name, c) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts = [xy(i, v) for i, v in enumerate(c)]
        if len(pts) == 1:
            pts = pts * 2
        d.line(pts, fill=colour, width=2)
        d.line([lx, 12 + 12 * k, lx + 20, 12 + 12 * k], fill=colour, width=2)
        d.text((lx + 24, 6 + 12 * k), f"{name} (max {max(c):.3g})" if c else name, fill=(0, 0, 0), font=font)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    return img


def cmd_lr_plot(args) -> int:
    cfg = TrainConfig.load(args.config).with_overrides(args.set or [])
    curves = curve_for_config(cfg, args.steps)
    name = cfg.lr_scheduler_type or cfg.lr_scheduler
    render_png(curves, Path(args.out), title=f"{cfg.optimizer_type}, {name}: learning rate per step")
    for g, c in curves.items():
        print(f"{g}: {len(c)} steps, start {c[0]:.3g}, max {max(c):.3g}, end {c[-1]:.3g}")
    print(f"wrote {args.out}")
    return 0


def add_lr_plot_command(sub) -> None:
    p = sub.add_parser("lr-plot", help="plot a config's learning-rate curve to a PNG (before training)")
    p.add_argument("--config", required=True, help="TOML config (sd-scripts names)")
    p.add_argument("--out", default="lr.png", help="PNG to write")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: from the dataset)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (TOML syntax)")
    p.set_defaults(func=cmd_lr_plot)
