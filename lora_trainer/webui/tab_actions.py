"""What the Train LoRA tab's buttons do, as plain functions of plain values (no gradio): the tab wires
them to components and turns their results into updates.

User mistakes come back as messages, never as tracebacks: a :class:`UserError` is shown as it is;
anything else is logged with its trace and shown as one line.
"""
from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config import TrainConfig
from ..errors import UserError
from . import tab_fields

log = logging.getLogger(__name__)

XYZ_NOTE = "Set the X/Y/Z options, then press Send to txt2img and Generate there."


def error_text(e: Exception, doing: str) -> str:
    if isinstance(e, UserError):
        return f"❌ {e}"
    log.exception("lora_trainer: %s failed", doing)
    return f"❌ {doing} failed: {type(e).__name__}: {e} (details in the WebUI console)"


# ------------------------------------------------------------------ config <-> widgets
def config(values: Dict[str, Any]) -> TrainConfig:
    return tab_fields.config_from_ui(values)


def output_path_text(output_name: str) -> str:
    from . import runtime
    try:
        return f"Files go to `{runtime.default_output_dir(output_name or 'lora')}`"
    except Exception:  # outside the WebUI
        return f"Files go to `<Lora folder>/{output_name}`"


def _loaded_model_kind():
    try:
        from modules import shared
        m = shared.sd_model
        return "sdxl" if getattr(m, "is_sdxl", False) else "sd2" if getattr(m, "is_sd2", False) else "sd1"
    except Exception:  # outside the WebUI, or no model
        return None


def check_dataset(values: Dict[str, Any], subject: str) -> str:
    from ..doctor import diagnose
    try:
        cfg = config(values)
    except UserError as e:
        return f"❌ {e}"
    if not cfg.train_data_dir and not cfg.dataset_config:
        return "Choose the dataset folder (it holds concept folders named N_name, N = repeats), then press Check."
    try:
        return diagnose(cfg, subject=subject or None, model_kind=_loaded_model_kind()).to_markdown()
    except Exception as e:
        return error_text(e, "Checking the dataset")


def preset_values(name: str) -> Tuple[Dict[str, Any], str, str]:
    """(widget values for the preset's fields, subject, description)."""
    from ..presets import get_preset
    p = get_preset(name)
    return {k: tab_fields.to_ui(k, v) for k, v in p.overrides.items()}, p.subject, p.description


def default_config_path(values: Dict[str, Any]) -> str:
    from . import runtime
    name = values.get("output_name") or "lora"
    return str(Path(runtime.default_output_dir(name)) / f"{name}.toml")


def save_config(path: str, values: Dict[str, Any]) -> str:
    try:
        cfg = config(values)
        target = Path(path.strip() if path and path.strip() else default_config_path(values)).expanduser()
        if target.suffix.lower() != ".toml":
            target = target.with_suffix(".toml")
        from .write_roots import check_path
        check_path("The config file", target)  # the same folders a run may write to
        target.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(target)
        return f"Saved `{target}`."
    except Exception as e:
        return error_text(e, "Saving the config")


def load_config(path: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """(widget values, message) from a TOML file: ours or sd-scripts' / kohya_ss'."""
    try:
        if not path or not str(path).strip():
            raise UserError("Enter the path of a .toml config file first.")
        cfg = TrainConfig.load(Path(str(path).strip()).expanduser())
    except Exception as e:
        return None, error_text(e, "Loading the config")
    return tab_fields.ui_values(cfg), load_message(cfg, Path(str(path).strip()).name)


def load_message(cfg: TrainConfig, source: str) -> str:
    lines = [f"Loaded `{source}`."]
    if cfg.unknown:
        lines.append(f"⚠️ {len(cfg.unknown)} keys are not known here and are ignored: "
                     + ", ".join(f"`{k}`" for k in sorted(cfg.unknown)) + ".")
    ignored = tab_fields.ignored_in_webui(cfg)
    if ignored:
        lines.append("Not used in the WebUI: " + "; ".join(ignored) + ".")
    problems = cfg.problems(need_dataset=False, need_output=False)
    if problems:
        lines.append("⚠️ Fix before training: " + " ".join(problems))
    return "\n\n".join(lines)


def config_toml(values: Dict[str, Any]) -> str:
    try:
        return config(values).to_toml()
    except UserError as e:
        return f"# {e}"


def lr_plot(values: Dict[str, Any]):
    """(PIL image or None, message): the learning-rate curve of the current settings, before training."""
    try:
        from ..lr_plot import curve_for_config, render_png
        cfg = config(values)
        curves = curve_for_config(cfg)
        name = cfg.lr_scheduler_type or cfg.lr_scheduler
        steps = max(len(c) for c in curves.values())
        return (render_png(curves, title=f"{cfg.optimizer_type}, {name}: learning rate per step"),
                f"{steps} steps; " + "; ".join(f"{g}: start {c[0]:.3g}, max {max(c):.3g}, end {c[-1]:.3g}"
                                                for g, c in curves.items()))
    except Exception as e:
        return None, error_text(e, "Plotting the learning rate")


def _arg_words(text: str) -> List[str]:
    return sorted(w for w in tab_fields.from_ui("optimizer_args", text or "") if w)


def optimizer_change(name: str, args_text: str) -> Tuple[Optional[str], str]:
    """(new optimizer_args text or None to leave them, one-line hint) when the user picks an optimizer.

    The guide's arguments for it fill optimizer_args when those are empty or still some optimizer's
    recommended arguments (the previous optimizer's, untouched); arguments the user wrote are kept and
    the recommendation is shown instead. Adaptive optimizers get the learning-rate hint."""
    from ..optim import recommended_args
    from ..optim.optimizers import OPTIMIZERS, resolve
    try:
        spec = resolve(name or "")
    except UserError:
        return None, ""
    label = (name or "").strip()  # the user's spelling (DAdaptation is an alias)
    rec = recommended_args(name)
    rec_text = tab_fields.to_ui("optimizer_args", rec)
    current = _arg_words(args_text)
    untouched = not current or any(current == sorted(recommended_args(s.name)) for s in OPTIMIZERS.values())
    new: Optional[str] = None
    hints = []
    if current == sorted(rec):
        pass
    elif untouched:
        new = rec_text
        if rec:
            hints.append(f"optimizer_args set to the guide's for {label}: `{rec_text}`.")
        elif current:
            hints.append(f"optimizer_args cleared: the guide recommends no arguments for {label}.")
    elif rec:
        hints.append(f"The guide recommends for {label}: `{rec_text}` (your optimizer_args were kept).")
    if spec.adaptive:
        hints.append(f"{label} is adaptive: set learning_rate ≈ 1.0 and one learning rate for UNet and text "
                     "encoder (unet_lr = text_encoder_lr = 1.0, or both empty).")
    if spec.note:
        hints.append(spec.note)
    return new, " ".join(hints)


# ------------------------------------------------------------------ training
def train(values: Dict[str, Any]) -> str:
    from . import runtime
    try:
        cfg = config(values)
        if cfg.unknown:  # pragma: no cover - the widgets only hold known fields
            raise UserError("unknown config keys: " + ", ".join(sorted(cfg.unknown)))
        run_id = runtime.start_training(cfg)
    except Exception as e:
        return error_text(e, "Starting the run")
    return f"Started run `{run_id}`."


def unfinished_choices() -> List[str]:
    """'name: epoch E, step S/T — path' for each unfinished run (the tab's Resume list)."""
    try:
        from . import runtime
        return [f"{r['output_name']}: epoch {r['epoch']}, step {r['step']}/{r['total_steps']} — {r['path']}"
                for r in runtime.unfinished_runs()]
    except Exception:
        return []


def resume(choice: str) -> str:
    from . import runtime
    if not choice:
        return "Choose an unfinished run first."
    try:
        run_id = runtime.resume_run(state=choice.rsplit(" — ", 1)[-1])
    except Exception as e:
        return error_text(e, "Resuming the run")
    return f"Resumed run `{run_id}`."


def stop() -> str:
    from . import runtime
    try:
        return "Stopping after the current step; finished epochs are kept." if runtime.stop_training() \
            else "No run is active."
    except Exception as e:
        return error_text(e, "Stopping")


def fmt_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


STATE_LABEL = {"idle": "Idle", "running": "Training", "stopping": "Stopping", "done": "Done",
               "error": "Failed", "stopped": "Stopped"}


def status_html(st: Dict[str, Any]) -> str:
    """The progress line: state, phase, epoch/step with a bar, loss, lr, elapsed and ETA."""
    state = st.get("state") or "idle"
    if state == "idle" and not st.get("run_id"):
        return "<div class='lt-status'>No run yet. Choose a dataset and press <b>Train</b>.</div>"
    esc = html.escape
    step, total = st.get("step") or 0, st.get("total_steps") or 0
    pct = 100.0 * step / total if total else 0.0
    parts = [f"<b>{STATE_LABEL.get(state, esc(state))}</b>"]
    if st.get("phase") and st.get("phase") not in (state, "training", "done", "stopped", "error"):
        parts.append(esc(str(st["phase"])))
    if st.get("total_epochs"):
        parts.append(f"epoch {st.get('epoch', 0)}/{st['total_epochs']}")
    if total:
        parts.append(f"step {step}/{total} ({pct:.0f}%)")
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    if st.get("epoch_loss") is not None:
        parts.append(f"epoch loss {st['epoch_loss']:.4f}")
    if st.get("lr") is not None:
        parts.append(f"lr {st['lr']:.2e}")
    parts.append(f"elapsed {fmt_seconds(st.get('elapsed'))}")
    if state in ("running", "stopping") and st.get("eta") is not None:
        parts.append(f"ETA {fmt_seconds(st.get('eta'))}")
    out = [f"<div class='lt-status lt-state-{esc(state)}'>" + " · ".join(parts) + "</div>",
           f"<progress class='lt-progress' value='{step}' max='{max(total, 1)}'></progress>"]
    if state in ("running", "stopping"):
        out.append("<div class='lt-note'>Generation requests wait while training holds the model.</div>")
    if st.get("error"):
        out.append(f"<div class='lt-error'>❌ {esc(str(st['error']))}</div>")
    elif st.get("message"):
        out.append(f"<div class='lt-message'>{esc(str(st['message']))}</div>")
    if st.get("warnings"):
        items = "".join(f"<li>{esc(str(w))}</li>" for w in st["warnings"][:20])
        more = f"<li>… and {len(st['warnings']) - 20} more</li>" if len(st["warnings"]) > 20 else ""
        out.append(f"<details class='lt-warnings'><summary>⚠️ {len(st['warnings'])} warning(s)</summary>"
                   f"<ul>{items}{more}</ul></details>")
    if st.get("memory_text"):
        out.append(f"<div class='lt-note'>Memory: {esc(str(st['memory_text']))}</div>")
    return "\n".join(out)


def loss_rows(step_losses: List[tuple], epoch_losses: List[tuple], total_steps: int, total_epochs: int
              ) -> List[Tuple[float, float, str]]:
    """(step, loss, series) rows: every synced step loss, and each epoch's mean at the epoch's last step."""
    rows = [(float(s), float(v), "step loss") for s, v in step_losses if v is not None and math.isfinite(v)]
    per_epoch = total_steps / total_epochs if total_steps and total_epochs else 0
    last_step = step_losses[-1][0] if step_losses else 0
    for e, v in epoch_losses:
        if v is None or not math.isfinite(v):
            continue
        x = min(e * per_epoch, last_step) if per_epoch else e
        rows.append((float(x), float(v), "epoch mean"))
    return rows


def files_markdown(files: List[str], output_dir: Optional[str]) -> str:
    if not files:
        return "No files saved yet." if output_dir is None else f"No files yet in `{output_dir}`."
    lines = [f"Saved to `{output_dir or Path(files[0]).parent}`:"]
    for f in files:
        p = Path(f)
        size = f", {p.stat().st_size / 1e6:.1f} MB" if p.is_file() else " (deleted)"
        lines.append(f"- `{p.name}`{size}")
    return "\n".join(lines)


def gallery_items(samples: List[str]) -> List[Tuple[str, str]]:
    """(path, caption) of the sample images that exist, newest epoch first: "epoch 3 #1"."""
    import re
    out = []
    for s in samples:
        p = Path(s)
        if p.is_file():
            m = re.search(r"_e(\d+)_(\d+)$", p.stem)
            out.append((s, f"epoch {int(m[1])} #{int(m[2]) + 1}" if m else p.stem))
    return out[::-1]


# ------------------------------------------------------------------ X/Y/Z
def run_folder_choices() -> List[str]:
    from . import runtime
    root = runtime.lora_dir()
    out = []
    for p in runtime.run_folders():
        try:
            out.append(str(p.relative_to(root)) or ".")
        except ValueError:
            out.append(str(p))
    return out


def folder_of_run(output_dir: Optional[str]) -> Optional[str]:
    if not output_dir:
        return None
    from . import runtime
    try:
        return str(Path(output_dir).relative_to(runtime.lora_dir())) or "."
    except ValueError:
        return output_dir


def xyz_preset(folder: str, weights: str, seeds_variant: bool, prompt: str, negative: str, steps, width, height,
               seed):
    from . import runtime
    if not folder:
        raise UserError("Choose a run folder (a folder under the Lora folder with epoch files).")
    return runtime.make_preset(folder=folder, weights=weights or "0.7-1.5 [5]", seeds_variant=bool(seeds_variant),
                               prompt=prompt or "", negative_prompt=negative or "", steps=int(steps or 20),
                               width=int(width) if width else None, height=int(height) if height else None,
                               seed=int(seed if seed not in (None, "") else 1234))


def xyz_infotext(*args) -> Tuple[str, str]:
    """(infotext for the paste button, message)."""
    try:
        p = xyz_preset(*args)
    except Exception as e:
        return "", error_text(e, "Building the X/Y/Z preset")
    rows = "seeds -1--1 [8]" if args[2] else f"weights {', '.join(f'{w:g}' for w in p.weights)}"
    return p.infotext, f"{len(p.stems)} files × {rows}. {XYZ_NOTE}"


def render_grid(*args):
    """(image or None, message)."""
    from . import runtime
    try:
        p = xyz_preset(*args)
        return runtime.render_grid(p), f"Rendered {len(p.stems)} files × {len(p.weights) if not args[2] else 1} rows."
    except Exception as e:
        return None, error_text(e, "Rendering the grid")
