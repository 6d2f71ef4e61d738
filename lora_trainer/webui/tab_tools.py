"""The Train LoRA tab's Tools section (issue 4): check, resize, merge into a checkpoint, extract and
combine, on files in the WebUI's Lora and checkpoint folders, calling :mod:`lora_trainer.post`.

Two layers, as in the rest of the tab:

- plain handlers (``run_check``, ``run_resize``, ``run_merge``, ``run_extract``, ``run_combine``) that
  take widget values and a :class:`Places` (the folders, the checkpoint list and the refresh hooks;
  :meth:`Places.webui` in the WebUI, a hand-made one in tests) and return ``(message, report)``:
  a Markdown message (``✅ …`` with the summary, or one ``❌`` line) and the tool's full text report.
  Nothing here raises: a :class:`UserError` is shown as it is, anything else as one line (the trace
  goes to the console).
- :func:`build_tools_section`, which makes the components and wires them (gradio and ``modules`` are
  imported inside functions only).

Outputs: LoRAs go under the Lora folder, merged checkpoints into the checkpoint folder. A name the
user types is checked (a file name, subfolders allowed, never outside the folder); an empty name
becomes a free default name. Nothing is replaced unless the user ticks *overwrite* on a tool that
supports it (merge never replaces a file).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .tab_actions import error_text

log = logging.getLogger(__name__)

Progress = Optional[Callable[[int, int, str], None]]
Result = Tuple[str, str]   # (Markdown message, full text report)

SECTION_TITLE = "Tools: resize, check, merge, extract, combine"
PRECISIONS = ["float", "fp16", "bf16"]
AS_INPUT = "as input"
AS_CHECKPOINT = "as the checkpoint"
NO_DYNAMIC = "none (fixed rank)"
DYNAMIC_METHODS = [NO_DYNAMIC, "sv_fro", "sv_cumulative", "sv_ratio"]
# the guide's resize example: at most rank 32, keep 90% of the Frobenius norm, written in bf16
RESIZE_DEFAULTS = dict(new_rank=32, new_conv_rank=0, dynamic_method="sv_fro", dynamic_param=0.9, save_precision="bf16")
EXTRACT_DEFAULTS = dict(dim=32, conv_dim=0, clamp_quantile=0.99, min_diff=0.01, save_precision="float")
CHECK_LEGEND = ("**Reading the statuses:** `zero-expected` = a text-encoder layer whose output the model never reads "
                "at this clip skip (SD2 and SDXL always skip the last one), so it cannot train: harmless. "
                "`zero` = a part that training should have changed is all zero (fp16 underflow, or it never "
                "trained): damage. `nonfinite` = NaN/Inf (the training diverged): damage.")
_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')
_NOT_SAFETENSORS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


# ------------------------------------------------------------------ where things are
@dataclass
class Places:
    """The folders the tools read and write, the WebUI's checkpoint list (title -> file) and what to
    call after writing (the WebUI's list refreshes)."""
    lora_root: Path
    checkpoint_dir: Path
    checkpoints: Dict[str, Path] = field(default_factory=dict)
    refresh_loras: Callable[[], None] = lambda: None
    refresh_checkpoints: Callable[[], None] = lambda: None

    @classmethod
    def webui(cls) -> "Places":
        from modules import sd_models, shared
        from . import runtime
        ckpt_dir = getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path
        return cls(runtime.lora_dir(), Path(ckpt_dir),
                   {title: Path(info.filename) for title, info in sd_models.checkpoints_list.items()},
                   runtime.refresh_lora_list, sd_models.list_models)

    def checkpoint_path(self, choice: str, what: str = "checkpoint") -> Path:
        if not choice or not str(choice).strip():
            raise UserError(f"Choose the {what} first (the list is the WebUI's checkpoint list; 🔄 re-reads it).")
        choice = str(choice).strip()
        if choice in self.checkpoints:
            return self.checkpoints[choice]
        bare = re.sub(r"\s*\[[^]]+]\s*$", "", choice)
        for title, path in self.checkpoints.items():
            if re.sub(r"\s*\[[^]]+]\s*$", "", title) == bare:
                return path
        p = Path(choice).expanduser()
        if p.is_file():
            return p
        raise UserError(f"{choice} is not in the WebUI's checkpoint list: press 🔄 and choose it again.")

    def lora_path(self, choice: str) -> Path:
        if not choice or not str(choice).strip():
            raise UserError("Choose a LoRA first (files under the Lora folder; 🔄 re-reads the folder).")
        p = Path(str(choice).strip()).expanduser()
        p = p if p.is_absolute() else self.lora_root / p
        if not p.is_file():
            raise UserError(f"{choice} is not in the Lora folder any more ({self.lora_root}): press 🔄.")
        return p


def lora_choices(root: Path) -> List[str]:
    """The .safetensors files under the Lora folder, as paths relative to it (subfolders first by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")
           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(out, key=str.lower)


def checkpoint_choices(places: Places) -> List[str]:
    return list(places.checkpoints)


# ------------------------------------------------------------------ names and numbers
def free_name(folder: Path, stem: str, suffix: str = ".safetensors") -> Path:
    """``folder/stem.safetensors``, or ``stem-1``, ``stem-2`` ... when taken."""
    p = folder / f"{stem}{suffix}"
    n = 1
    while p.exists() or p.with_suffix(".yaml").exists():  # merge copies the model config next to it
        p = folder / f"{stem}-{n}{suffix}"
        n += 1
    return p


def output_target(name: str, folder: Path, default: Path, what: str = "LoRA") -> Path:
    """Where a tool writes: ``name`` under ``folder`` (subfolders allowed, never outside it), or
    ``default`` (a free name) when ``name`` is empty. The ``.safetensors`` suffix is added when missing.
    Whether the file may exist is the tool's check (overwrite)."""
    name = (name or "").strip()
    if not name:
        return default
    if _BAD_CHARS.search(name):
        raise UserError(f"Output name {name!r}: use letters, digits, spaces, - _ . and / for subfolders "
                        "(not < > : \" | ? * or control characters).")
    p = Path(name.replace("\\", "/"))
    if p.is_absolute() or p.drive:
        raise UserError(f"Output name {name!r}: give a name inside the {what} folder ({folder}), not a full path.")
    if any(part in ("..", ".") for part in p.parts) or any(part.startswith(".") for part in p.parts):
        raise UserError(f"Output name {name!r}: '..', '.' and names starting with '.' are not allowed; the file "
                        f"goes inside {folder}.")
    if p.suffix.lower() in _NOT_SAFETENSORS:
        raise UserError(f"Output name {name!r}: the {what} is written as .safetensors only.")
    if p.suffix.lower() != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    target = Path(folder) / p
    try:
        target.resolve().relative_to(Path(folder).resolve())
    except ValueError:
        raise UserError(f"Output name {name!r} leads outside {folder} (a link?): choose another name.") from None
    return target


def _int_or_none(v, label: str, zero_is_none: bool = True) -> Optional[int]:
    """Widget number -> int; 0 or empty = not set."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{label} {v!r} is not a number.") from None
    if not f.is_integer():
        raise UserError(f"{label} {v} must be a whole number.")
    if f < 0:
        raise UserError(f"{label} {int(f)} must be at least 1 (0 = not set).")
    return None if f == 0 and zero_is_none else int(f)


def _float(v, label: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"{label} {v!r} is not a number.") from None


def _precision(choice: Optional[str]) -> Optional[str]:
    return choice if choice in PRECISIONS else None


def parse_ratios(text: str, n: int) -> List[float]:
    """``"0.8, 0.5"`` / ``"0.8 0.5"`` -> one ratio per chosen LoRA; empty = 1 for each."""
    words = [w for w in re.split(r"[,;\s]+", (text or "").strip()) if w]
    if not words:
        return [1.0] * n
    try:
        ratios = [float(w) for w in words]
    except ValueError:
        raise UserError(f"Ratios {text!r}: write numbers separated by commas, e.g. 0.8, 0.5.") from None
    if len(ratios) != n:
        raise UserError(f"{n} LoRAs chosen but {len(ratios)} ratios given: give one ratio per LoRA, in the order "
                        "they were chosen (empty = 1 for each).")
    return ratios


def _as_list(v) -> List[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    return [x for x in v if x]


def _stem_part(name: str, limit: int = 40) -> str:
    return re.sub(r"[^\w.+-]+", "_", name)[:limit].strip("._") or "x"


# ------------------------------------------------------------------ messages
def _done(path: Path, report_lines: Sequence[str], head: str = "") -> Result:
    size = f" ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else ""
    notes = [ln.split(": ", 1)[1] for ln in report_lines if ln.startswith(("summary: ", "note: "))]
    msg = [f"✅ {head}Wrote `{path}`{size}."] + [f"- {n}" for n in notes]
    return "\n".join(msg), "\n".join(report_lines)


def _failed(e: Exception, doing: str) -> Result:
    return error_text(e, doing).replace("\n", " "), ""


def _same_name_warning(places: Places, out: Path) -> str:
    """The WebUI lists LoRAs by file name: another file with the same name makes <lora:name> ambiguous."""
    try:
        others = [p for p in places.lora_root.rglob(out.name) if p.resolve() != out.resolve()]
    except OSError:
        return ""
    if not others:
        return ""
    return (f"\n- ⚠️ {others[0].relative_to(places.lora_root).as_posix()} has the same file name: the WebUI's "
            f"`<lora:{out.stem}:1>` may pick either; rename one of them.")


# ------------------------------------------------------------------ the tools
def run_check(lora: str, places: Optional[Places] = None) -> Result:
    """Look for zero, NaN and Inf tensors, with the verdict and what the zeros mean."""
    from ..post import check_lora
    try:
        places = places or Places.webui()
        r = check_lora(places.lora_path(lora))
    except Exception as e:
        return _failed(e, "Checking the LoRA")
    summary = [ln[len("summary: "):] for ln in r.lines(per_module=False) if ln.startswith("summary: ")]
    head = (f"❌ **DAMAGED**: {r.path.name}" if r.damaged else f"✅ **OK**: {r.path.name} shows no damage")
    counts: Dict[str, int] = {}
    for m in r.modules:
        counts[m.status] = counts.get(m.status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    msg = [f"{head} ({status}; {r.dtype})."] + [f"- {s}" for s in summary]
    if any(s != "ok" for s in counts):
        msg += ["", CHECK_LEGEND]
    return "\n".join(msg), "\n".join(r.lines())


def run_resize(lora: str, new_rank, new_conv_rank, dynamic_method: str, dynamic_param, save_precision: str,
               out_name: str, overwrite: bool, places: Optional[Places] = None, progress: Progress = None) -> Result:
    from ..post import resize_lora
    try:
        places = places or Places.webui()
        src = places.lora_path(lora)
        rank = _int_or_none(new_rank, "new_rank")
        conv = _int_or_none(new_conv_rank, "new_conv_rank")
        method = dynamic_method if dynamic_method and dynamic_method != NO_DYNAMIC else None
        param = _float(dynamic_param, "dynamic_param") if method else None
        tag = f"{method}{param:g}" if method else f"r{rank}"
        default = free_name(src.parent, f"{src.stem}-{tag}" + (f"-max{rank}" if method and rank else ""))
        out = output_target(out_name, places.lora_root, default)
        r = resize_lora(src, out, new_rank=rank, new_conv_rank=conv, dynamic_method=method, dynamic_param=param,
                        save_precision=_precision(save_precision), overwrite=bool(overwrite), progress=progress)
    except Exception as e:
        return _failed(e, "Resizing the LoRA")
    places.refresh_loras()
    msg, report = _done(r.output, r.lines())
    return msg + _same_name_warning(places, r.output), report


def run_merge(checkpoint: str, loras, ratios: str, out_name: str, save_precision: str,
              places: Optional[Places] = None, progress: Progress = None) -> Result:
    """Merge LoRAs into a checkpoint from the WebUI's list, written as a new file in the checkpoint folder."""
    from ..post import merge_lora_into_checkpoint
    try:
        places = places or Places.webui()
        ckpt = places.checkpoint_path(checkpoint)
        names = _as_list(loras)
        if not names:
            raise UserError("Choose one or more LoRAs to merge.")
        paths = [places.lora_path(n) for n in names]
        specs = list(zip([str(p) for p in paths], parse_ratios(ratios, len(paths))))
        stem = "_".join([_stem_part(ckpt.stem)] + [_stem_part(p.stem, 30) for p in paths[:3]])
        out = output_target(out_name, places.checkpoint_dir, free_name(places.checkpoint_dir, stem), "checkpoint")
        r = merge_lora_into_checkpoint(ckpt, specs, out, save_precision=_precision(save_precision),
                                       progress=progress)
    except Exception as e:
        return _failed(e, "Merging into the checkpoint")
    try:
        places.refresh_checkpoints()
    except Exception as e:  # the file is written; the list can be refreshed by hand
        log.warning("lora_trainer: could not refresh the checkpoint list: %s", e)
    msg, report = _done(r.output, r.lines())
    return msg + "\n- It is in the checkpoint list now (the menu at the top of the page).", report


def run_extract(base: str, tuned: str, dim, conv_dim, clamp_quantile, min_diff, save_precision: str, out_name: str,
                overwrite: bool, places: Optional[Places] = None, progress: Progress = None) -> Result:
    """A LoRA from a fine-tuned checkpoint and its base, into the Lora folder."""
    from ..post import extract_lora
    try:
        places = places or Places.webui()
        org = places.checkpoint_path(base, "base checkpoint")
        tun = places.checkpoint_path(tuned, "fine-tuned checkpoint")
        d = _int_or_none(dim, "dim")
        if d is None:
            raise UserError("dim must be at least 1 (e.g. 32).")
        default = free_name(places.lora_root, f"{_stem_part(tun.stem)}-extracted-d{d}")
        out = output_target(out_name, places.lora_root, default)
        r = extract_lora(org, tun, out, dim=d, conv_dim=_int_or_none(conv_dim, "conv_dim"),
                         clamp_quantile=_float(clamp_quantile, "clamp_quantile"),
                         min_diff=_float(min_diff, "min_diff"), save_precision=_precision(save_precision) or "float",
                         overwrite=bool(overwrite), progress=progress)
    except Exception as e:
        return _failed(e, "Extracting the LoRA")
    places.refresh_loras()
    msg, report = _done(r.output, r.lines())
    return msg + _same_name_warning(places, r.output), report


def run_combine(loras, ratios: str, new_rank, new_conv_rank, save_precision: str, out_name: str, overwrite: bool,
                places: Optional[Places] = None, progress: Progress = None) -> Result:
    """Several LoRAs with ratios into one LoRA in the Lora folder."""
    from ..post import combine_loras
    try:
        places = places or Places.webui()
        names = _as_list(loras)
        if len(names) < 2:
            raise UserError("Choose two or more LoRAs to combine.")
        paths = [places.lora_path(n) for n in names]
        specs = list(zip([str(p) for p in paths], parse_ratios(ratios, len(paths))))
        default = free_name(places.lora_root, "_".join(_stem_part(p.stem, 30) for p in paths[:3]) + "-combined")
        out = output_target(out_name, places.lora_root, default)
        r = combine_loras(specs, out, new_rank=_int_or_none(new_rank, "new_rank"),
                          new_conv_rank=_int_or_none(new_conv_rank, "new_conv_rank"),
                          save_precision=_precision(save_precision), overwrite=bool(overwrite), progress=progress)
    except Exception as e:
        return _failed(e, "Combining the LoRAs")
    places.refresh_loras()
    msg, report = _done(r.output, r.lines(per_module=True))
    return msg + _same_name_warning(places, r.output), report


# ------------------------------------------------------------------ the section (gradio)
_REFRESH_TOP_CHECKPOINTS_JS = ("() => { const b = gradioApp().querySelector('#refresh_sd_model_checkpoint'); "
                               "if (b) b.click(); return []; }")


def _safe_places() -> Optional[Places]:
    try:
        return Places.webui()
    except Exception as e:
        log.debug("lora_trainer: tools cannot find the folders: %s", e)
        return None


def _choices() -> Tuple[List[str], List[str]]:
    p = _safe_places()
    return (lora_choices(p.lora_root), checkpoint_choices(p)) if p else ([], [])


def build_tools_section() -> None:
    """The Tools accordion (closed at start), with its own wiring. Call inside the tab's Blocks."""
    import gradio as gr
    from modules.ui_components import ToolButton
    loras, ckpts = _choices()
    c: Dict[str, object] = {}
    quiet = dict(show_progress="hidden")

    def lora_pick(key, label, multi=False, info=None):
        c[key] = gr.Dropdown(label=label, choices=loras, value=[] if multi else None, multiselect=multi,
                             info=info, elem_id=f"lora_trainer_tools_{key}")

    def ckpt_pick(key, label, info=None):
        c[key] = gr.Dropdown(label=label, choices=ckpts, value=None, info=info, elem_id=f"lora_trainer_tools_{key}")

    def refresh(key):
        c[key] = ToolButton("🔄", elem_id=f"lora_trainer_tools_{key}", tooltip="Re-read the Lora and checkpoint lists")

    def num(key, label, value, info=None, precision=0):
        c[key] = gr.Number(label=label, value=value, precision=precision, info=info, min_width=100,
                           elem_id=f"lora_trainer_tools_{key}")

    def out(key, info):
        c[key] = gr.Textbox(label="Output name", placeholder="empty = a new name (shown after the run)", info=info,
                            elem_id=f"lora_trainer_tools_{key}")

    def overwrite(key):
        c[key] = gr.Checkbox(label="Overwrite", value=False, info="replace an existing file of that name",
                             elem_id=f"lora_trainer_tools_{key}")

    lora_out_info = "A file name under the Lora folder (subfolders allowed); .safetensors is added."
    with gr.Accordion(SECTION_TITLE, open=False, elem_id="lora_trainer_tools"):
        c["where"] = gr.Markdown(_where_text(), elem_id="lora_trainer_tools_where")
        with gr.Tabs(elem_id="lora_trainer_tools_tabs"):
            with gr.Tab("Check", elem_id="lora_trainer_tools_tab_check"):
                with gr.Row():
                    lora_pick("check_lora", "LoRA", info="Zero, NaN and Inf tensors per module, with a verdict.")
                    refresh("check_refresh")
                c["check_run"] = gr.Button("Check", variant="primary", elem_id="lora_trainer_tools_check_run")
            with gr.Tab("Resize", elem_id="lora_trainer_tools_tab_resize"):
                with gr.Row():
                    lora_pick("resize_lora", "LoRA", info="Lower its rank by SVD (sd-scripts resize_lora).")
                    refresh("resize_refresh")
                d = RESIZE_DEFAULTS
                with gr.Row():
                    num("resize_rank", "new_rank", d["new_rank"], "rank; with a dynamic method the most a module keeps "
                        "(0 = no cap)")
                    num("resize_conv_rank", "new_conv_rank", d["new_conv_rank"],
                        "conv modules (3x3 LoCon; 1x1 too, as sd-scripts); 0 = new_rank")
                    c["resize_method"] = gr.Dropdown(label="dynamic_method", choices=DYNAMIC_METHODS,
                                                     value=d["dynamic_method"], elem_id="lora_trainer_tools_resize_method",
                                                     info="sv_fro: keep this share of the Frobenius norm")
                    num("resize_param", "dynamic_param", d["dynamic_param"], "sv_fro/sv_cumulative 0.9; sv_ratio 2",
                        precision=None)
                    c["resize_precision"] = gr.Dropdown(label="save_precision", choices=PRECISIONS + [AS_INPUT],
                                                        value=d["save_precision"],
                                                        elem_id="lora_trainer_tools_resize_precision")
                with gr.Row():
                    out("resize_out", lora_out_info + " Empty = next to the input, e.g. name-sv_fro0.9-max32.")
                    overwrite("resize_overwrite")
                c["resize_run"] = gr.Button("Resize", variant="primary", elem_id="lora_trainer_tools_resize_run")
            with gr.Tab("Merge into checkpoint", elem_id="lora_trainer_tools_tab_merge"):
                with gr.Row():
                    ckpt_pick("merge_ckpt", "Checkpoint", info="From the WebUI's checkpoint list; it is not changed.")
                    refresh("merge_refresh")
                with gr.Row():
                    lora_pick("merge_loras", "LoRAs", multi=True, info="One or more, in order.")
                    c["merge_ratios"] = gr.Textbox(label="Ratios", placeholder="e.g. 0.8, 0.5 (empty = 1 each)",
                                                   info="One per LoRA, in the order chosen: <lora:name:ratio>.",
                                                   elem_id="lora_trainer_tools_merge_ratios")
                with gr.Row():
                    out("merge_out", "A new file in the checkpoint folder (never replaces one). Empty = "
                                     "<checkpoint>_<loras>.")
                    c["merge_precision"] = gr.Dropdown(label="save_precision", choices=[AS_CHECKPOINT] + PRECISIONS,
                                                       value=AS_CHECKPOINT, elem_id="lora_trainer_tools_merge_precision")
                c["merge_run"] = gr.Button("Merge into a new checkpoint", variant="primary",
                                           elem_id="lora_trainer_tools_merge_run")
            with gr.Tab("Extract", elem_id="lora_trainer_tools_tab_extract"):
                with gr.Row():
                    ckpt_pick("extract_base", "Base checkpoint", info="The model the fine-tune started from.")
                    ckpt_pick("extract_tuned", "Fine-tuned checkpoint", info="Its difference becomes the LoRA.")
                    refresh("extract_refresh")
                d = EXTRACT_DEFAULTS
                with gr.Row():
                    num("extract_dim", "dim", d["dim"], "rank of linear and 1x1 conv modules (sd-scripts' default: 4)")
                    num("extract_conv_dim", "conv_dim", d["conv_dim"], "3x3 conv (LoCon) rank; 0 = none")
                    num("extract_clamp", "clamp_quantile", d["clamp_quantile"], "1 = no clamping", precision=None)
                    num("extract_min_diff", "min_diff", d["min_diff"], "text encoder left out below this",
                        precision=None)
                    c["extract_precision"] = gr.Dropdown(label="save_precision", choices=PRECISIONS,
                                                         value=d["save_precision"],
                                                         elem_id="lora_trainer_tools_extract_precision")
                with gr.Row():
                    out("extract_out", lora_out_info + " Empty = <fine-tuned>-extracted-d<dim>.")
                    overwrite("extract_overwrite")
                c["extract_run"] = gr.Button("Extract", variant="primary", elem_id="lora_trainer_tools_extract_run")
            with gr.Tab("Combine", elem_id="lora_trainer_tools_tab_combine"):
                with gr.Row():
                    lora_pick("combine_loras", "LoRAs", multi=True, info="Two or more, for the same model kind.")
                    c["combine_ratios"] = gr.Textbox(label="Ratios", placeholder="e.g. 1, 0.5 (empty = 1 each)",
                                                     info="One per LoRA, in the order chosen.",
                                                     elem_id="lora_trainer_tools_combine_ratios")
                    refresh("combine_refresh")
                with gr.Row():
                    num("combine_rank", "new_rank", 0, "0 = concatenate the ranks (exact); N = re-factor by SVD")
                    num("combine_conv_rank", "new_conv_rank", 0, "3x3 conv modules with new_rank; 0 = new_rank")
                    c["combine_precision"] = gr.Dropdown(label="save_precision", choices=[AS_INPUT] + PRECISIONS,
                                                         value=AS_INPUT, info="as input = the first file's",
                                                         elem_id="lora_trainer_tools_combine_precision")
                with gr.Row():
                    out("combine_out", lora_out_info + " Empty = <names>-combined.")
                    overwrite("combine_overwrite")
                c["combine_run"] = gr.Button("Combine", variant="primary", elem_id="lora_trainer_tools_combine_run")
        c["msg"] = gr.Markdown("", elem_id="lora_trainer_tools_msg")
        c["report"] = gr.Textbox(label="Report", lines=6, max_lines=30, interactive=False, show_copy_button=True,
                                 elem_id="lora_trainer_tools_report")
    # The WebUI's ui-config.json keys values by tab and label: "save_precision", "new_rank", "LoRA" ... appear
    # in several tools and in the training settings, and would overwrite each other's defaults there.
    for comp in c.values():
        comp.do_not_save_to_config = True
    _wire(c, quiet)


def _where_text() -> str:
    p = _safe_places()
    if p is None:
        return "The tools work on files in the Lora folder and the checkpoint folder."
    return (f"LoRAs are read from and written to `{p.lora_root}`; merged checkpoints go to `{p.checkpoint_dir}`. "
            "Existing files are never replaced unless you tick *Overwrite*. The tools run on the CPU, on files: "
            "the loaded model and a training run are not touched.")


def _wire(c: dict, quiet: dict) -> None:
    import gradio as gr
    lora_keys = ["check_lora", "resize_lora", "merge_loras", "combine_loras"]
    ckpt_keys = ["merge_ckpt", "extract_base", "extract_tuned"]

    def refreshed(reread_checkpoints=False):
        if reread_checkpoints:
            try:
                from modules import sd_models
                sd_models.list_models()
            except Exception as e:
                log.warning("lora_trainer: could not refresh the checkpoint list: %s", e)
        loras, ckpts = _choices()
        return [gr.update(choices=loras) for _ in lora_keys] + [gr.update(choices=ckpts) for _ in ckpt_keys]

    pickers = [c[k] for k in lora_keys + ckpt_keys]
    for key in ("check_refresh", "resize_refresh", "merge_refresh", "extract_refresh", "combine_refresh"):
        c[key].click(lambda: refreshed(True), None, pickers, **quiet)

    results = [c["msg"], c["report"]]

    def with_progress(fn, desc):
        def run(progress=gr.Progress(), *args):  # gradio finds Progress only among positional parameters
            def step(i, n, name):
                progress(i / max(n, 1), desc=f"{desc} {i}/{n}")
            return list(fn(*args, progress=step)) + refreshed()
        return run

    c["check_run"].click(lambda lora: list(run_check(lora)), [c["check_lora"]], results)
    c["resize_run"].click(with_progress(run_resize, "Resizing"),
                          [c[k] for k in ("resize_lora", "resize_rank", "resize_conv_rank", "resize_method",
                                          "resize_param", "resize_precision", "resize_out", "resize_overwrite")],
                          results + pickers)
    merge = c["merge_run"].click(with_progress(run_merge, "Merging"),
                                 [c[k] for k in ("merge_ckpt", "merge_loras", "merge_ratios", "merge_out",
                                                 "merge_precision")], results + pickers)
    # the WebUI's own checkpoint menu at the top of the page: its 🔄 re-reads the (already refreshed) list
    merge.then(None, None, None, _js=_REFRESH_TOP_CHECKPOINTS_JS)
    c["extract_run"].click(with_progress(run_extract, "Extracting"),
                           [c[k] for k in ("extract_base", "extract_tuned", "extract_dim", "extract_conv_dim",
                                           "extract_clamp", "extract_min_diff", "extract_precision", "extract_out",
                                           "extract_overwrite")], results + pickers)
    c["combine_run"].click(with_progress(run_combine, "Combining"),
                           [c[k] for k in ("combine_loras", "combine_ratios", "combine_rank", "combine_conv_rank",
                                           "combine_precision", "combine_out", "combine_overwrite")],
                           results + pickers)
