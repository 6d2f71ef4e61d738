"""The extension's state inside the WebUI process: the one training service, its WebUI hooks
(progress into ``shared.state``, stop on Interrupt, Lora list refresh, card sidecars), the Lora folder
and the X/Y/Z helpers. The tab and the HTTP API both call these functions.
"""
from __future__ import annotations

import json
import re
import logging
import shutil
import threading
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import TrainConfig
from ..errors import UserError
from ..service import TrainingService
from ..train.progress import Progress

log = logging.getLogger(__name__)

_service: Optional[TrainingService] = None
_service_lock = threading.Lock()
_run_extras: Dict[str, dict] = {}   # run_id -> {"triggers": [...], "model_kind": ...}


# ------------------------------------------------------------------ paths
def lora_dir() -> Path:
    from modules import shared
    d = getattr(shared.cmd_opts, "lora_dir", None)
    if not d:
        from modules import paths
        d = str(Path(paths.models_path) / "Lora")
    return Path(d)


def default_output_dir(output_name: str) -> str:
    return str(lora_dir() / output_name)


def run_folders() -> List[Path]:
    """Folders under the Lora dir holding epoch files (name-000001.safetensors ...), newest first."""
    from ..xyz import EPOCH_RE
    root = lora_dir()
    out = set()
    if root.is_dir():
        for p in root.rglob("*.safetensors"):
            if EPOCH_RE.match(p.stem):
                out.add(p.parent)
    return sorted(out, key=lambda p: p.stat().st_mtime, reverse=True)


# ------------------------------------------------------------------ the service
def get_service() -> TrainingService:
    global _service
    with _service_lock:
        if _service is None:
            _service = TrainingService(_make_host, prepare_config=_prepare_config, on_progress=_on_progress,
                                       on_saved=_on_saved, on_finished=_on_finished, should_stop=_webui_stop_requested)
        return _service


def _prepare_config(cfg: TrainConfig) -> TrainConfig:
    """Everything that can be refused is refused here, before a run starts (the API answers 400)."""
    from modules import shared
    from ..dataset.triggers import trigger_words
    from ..run import build_data
    from .host import _refuse_unsupported
    _refuse_unsupported(shared.sd_model)
    unet_dtype = next(shared.sd_model.model.diffusion_model.parameters()).dtype
    if cfg.mixed_precision == "no" and unet_dtype != torch.float32:
        raise UserError(f"The loaded model is {str(unet_dtype).replace('torch.', '')} (the WebUI's default): set "
                        "mixed_precision to fp16 or bf16, or start the WebUI with --no-half to train in float32.")
    if not cfg.output_dir:
        cfg = cfg.replace(output_dir=default_output_dir(cfg.output_name))
    cfg.validate()
    from .write_roots import check_writes
    check_writes(cfg)  # output_dir, logging_dir: under the Lora folder or an allowed one, before anything exists
    data = build_data(cfg)  # dataset errors surface now, before the run starts
    if cfg.cache_latents and cfg.cache_latents_to_disk:
        check_writes(cfg, [item.path for item in data.items])  # the latent cache beside the images
    _run_extras["pending"] = {"triggers": trigger_words(data.items, cfg.keep_tokens)}
    return cfg


def _make_host(cfg: TrainConfig):
    from .host import make_host
    host = make_host(clip_skip=cfg.clip_skip, train_text_encoder=cfg.train_text_encoder())
    svc = get_service()
    _run_extras[svc.run_id] = dict(_run_extras.pop("pending", {}), model_kind=host.model_kind)
    return host


def start_training(cfg: TrainConfig) -> str:
    return get_service().start(cfg)


def unfinished_runs() -> List[dict]:
    """Training states under the Lora folder whose run did not finish (newest first)."""
    from ..train.state import unfinished_runs as find
    return find(lora_dir())


def resume_run(state: str = "", output_name: str = "", overrides: Optional[dict] = None) -> str:
    """Start a run again from its training state, with the config it was saved with (+ ``overrides``)."""
    from ..train import state as train_state
    if not state:
        runs = [r for r in unfinished_runs() if not output_name or r["output_name"] == output_name]
        if not runs:
            raise UserError(f"No unfinished run{' named ' + repr(output_name) if output_name else ''} under "
                            f"{lora_dir()}: nothing to resume.")
        state = runs[0]["path"]
    st = train_state.load(Path(state))
    data = dict(st.get("config", {}))
    data.update(overrides or {})
    data["resume"] = st["path"]
    return start_training(TrainConfig.from_dict(data))


def stop_training() -> bool:
    return get_service().stop()


def status() -> dict:
    return get_service().status()


def _webui_stop_requested() -> bool:
    from modules import shared
    return bool(shared.state.interrupted or shared.state.stopping_generation)


def _on_progress(p: Progress) -> None:
    from modules import shared
    st = shared.state
    st.job = "train-lora"
    st.job_count = max(1, p.total_steps)
    st.job_no = p.step
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    st.textinfo = f"Training LoRA: epoch {p.epoch}/{p.total_epochs}, step {p.step}/{p.total_steps}, loss {loss}"


def _on_saved(path: Path, meta: Dict[str, str]) -> None:
    """Each epoch file: refresh the WebUI's Lora list, re-read it the WebUI's way (zero unmatched keys),
    write the card's sidecar."""
    svc = get_service()
    extras = _run_extras.get(svc.run_id or "", {})
    write_sidecar(path, meta, extras.get("triggers", []), extras.get("model_kind", "sd1"))
    refresh_lora_list()
    problem = verify_with_webui_loader(path)
    if problem:
        log.error("%s", problem)
        svc.progress.message = problem


def _on_finished(svc: TrainingService) -> None:
    """Free what the run allocated (latent cache, optimizer state) and give each epoch file its
    epoch's first sample image as the card preview."""
    try:
        from modules import devices
        devices.torch_gc()
    except Exception:
        pass
    cfg = svc.config
    if cfg is None:
        return
    import re
    for f in svc.progress.files:
        p = Path(f)
        m = re.search(r"-(\d{6})$", p.stem)
        epoch = int(m[1]) if m else (svc.progress.epoch_losses[-1][0] if svc.progress.epoch_losses else 0)
        sample = Path(cfg.output_dir) / "sample" / f"{cfg.output_name}_e{epoch:06d}_00.png"
        if sample.is_file() and not p.with_suffix(".png").exists():
            shutil.copyfile(sample, p.with_suffix(".png"))
    refresh_lora_list()


def write_sidecar(path: Path, meta: Dict[str, str], triggers: List[str], model_kind: str) -> None:
    from ..io.atomic import atomic_write_bytes
    side = {
        "description": f"Trained in the WebUI by sd-webui-lora-trainer (epoch {meta.get('ss_epoch', '?')}, "
                       f"{meta.get('ss_steps', '?')} steps, dim {meta.get('ss_network_dim')}, "
                       f"alpha {meta.get('ss_network_alpha')}).",
        "sd version": {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(model_kind, "Unknown"),
        "activation text": ", ".join(triggers),
        "preferred weight": 0,
        "notes": f"base model: {meta.get('ss_sd_model_name', '')}",
    }
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(side, indent=4, ensure_ascii=False).encode("utf-8"))


def refresh_lora_list() -> None:
    try:
        import networks
        networks.list_available_networks()
    except Exception as e:  # never fail a save over the list
        log.warning("could not refresh the Lora list: %s", e)


def verify_with_webui_loader(path: Path) -> Optional[str]:
    """Load the file with the WebUI's own Lora loader and report the keys it could not match (the
    loader says so only in a debug log record, which is captured here)."""
    import logging as _logging
    try:
        import networks
        name = path.stem
        on_disk = networks.available_networks.get(name)
        if on_disk is None:
            networks.list_available_networks()
            on_disk = networks.available_networks.get(name)
        if on_disk is None:
            return f"{path.name} is not in the WebUI's Lora list after a refresh: is it under the Lora folder?"
        records: List[str] = []

        class _Catch(_logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if "didn't match keys" in msg:
                    records.append(msg)

        root = _logging.getLogger()
        handler, old_level = _Catch(_logging.DEBUG), root.level
        root.addHandler(handler)
        root.setLevel(_logging.DEBUG)
        try:
            net = networks.load_network(name, on_disk)
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
        if records:
            return f"{path.name}: the WebUI's Lora loader left keys unmatched: {records[0][:300]}"
        if not net.modules:
            return f"{path.name}: the WebUI's Lora loader bound no layer of the loaded model."
        return None
    except Exception as e:
        return f"{path.name}: the WebUI's Lora loader could not read it back ({type(e).__name__}: {e})"


# ------------------------------------------------------------------ model summary for the tab
def model_summary() -> str:
    from modules import shared
    m = shared.sd_model
    if m is None:
        return "No model loaded."
    info = getattr(m, "sd_checkpoint_info", None)
    kind = "SDXL" if getattr(m, "is_sdxl", False) else "SD2" if getattr(m, "is_sd2", False) else "SD1"
    pred = "v-prediction" if getattr(m, "parameterization", "eps") == "v" else "epsilon"
    return f"{getattr(info, 'name', '?')} ({kind}, {pred})"


# ------------------------------------------------------------------ X/Y/Z
def run_triggers(folder: Path) -> str:
    """The activation text stored in a run's sidecars."""
    for j in sorted(Path(folder).glob("*.json")):
        try:
            t = json.loads(j.read_text(encoding="utf-8")).get("activation text", "")
            if t:
                return t
        except (OSError, ValueError):
            continue
    return ""


def make_preset(folder: Optional[str] = None, run_id: Optional[str] = None, *, weights: str = "0.7-1.5 [5]",
                seeds_variant: bool = False, prompt: str = "", negative_prompt: str = "", steps: int = 20,
                width: Optional[int] = None, height: Optional[int] = None, seed: int = 1234):
    """The epochs x weights preset of a run. Width/height default to the size the run trained at
    (its ``ss_resolution``: 1024x1024 for an SDXL run), the clip skip to the run's."""
    from ..xyz import build_preset, epoch_stems
    svc = get_service()
    output_name = None
    clip_skip = 1
    if folder is None:
        info = svc.run_info(run_id)
        if info is None:
            raise UserError(f"No run {run_id!r} is known: pass a run_id from /status, or a folder.")
        folder, output_name = info["output_dir"], info["output_name"]
        if svc.config is not None and info["run_id"] == svc.run_id:
            clip_skip = svc.config.clip_skip
    folder_p = Path(folder)
    if not folder_p.is_absolute():
        folder_p = lora_dir() / folder_p
    stems = epoch_stems(folder_p, output_name)
    trained = (1024, 1024) if model_summary_kind() == "sdxl" else (512, 512)
    if stems:  # the clip skip the run trained with (a pasted "Clip skip" overrides the user's setting)
        from ..io.lora_file import read_metadata
        try:
            meta = read_metadata(folder_p / f"{stems[0]}.safetensors")
            clip_skip = int(meta.get("ss_clip_skip", clip_skip))
            m = re.fullmatch(r"\((\d+), (\d+)\)", meta.get("ss_resolution", ""))
            if m:
                trained = (int(m[1]), int(m[2]))
        except (UserError, ValueError):
            pass
    width, height = width or trained[0], height or trained[1]
    return build_preset(stems, weights=weights, trigger_words=run_triggers(folder_p), prompt=prompt,
                        negative_prompt=negative_prompt, seeds_variant=seeds_variant, steps=steps, width=width,
                        height=height, seed=seed, clip_skip=clip_skip)


def model_summary_kind() -> str:
    try:
        from modules import shared
        return "sdxl" if getattr(shared.sd_model, "is_sdxl", False) else "sd1"
    except Exception:
        return "sd1"


def axis_indices() -> Dict[str, int]:
    """Axis label -> index in this WebUI's X/Y/Z plot (extensions may append axes)."""
    from ..xyz import V1_10_AXES
    try:
        from modules import scripts
        for s in scripts.scripts_txt2img.scripts:
            if s.title() == "X/Y/Z plot":
                labels = [a.label for a in getattr(s, "current_axis_options", [])]
                if labels:
                    return {label: i for i, label in enumerate(labels)}
    except Exception:
        pass
    return dict(V1_10_AXES)


def render_grid(preset, lock: bool = True):
    """Render the preset's epochs x weights grid with the WebUI's own pipeline (under the generation lock)."""
    import contextlib
    from modules import call_queue, images, processing, shared
    from ..xyz import grid_cells
    if get_service().is_active():
        raise UserError("A training run holds the model: render the grid after it finishes.")
    import random
    import re
    ctx = call_queue.queue_lock if lock else contextlib.nullcontext()
    if preset.y_type == "Seed":  # rows: random seeds (-1--1 [8] -> 8 of them), each epoch at weight 1
        m = re.search(r"\[(\d+)\]", preset.y_values)
        seeds = [random.randrange(2 ** 31) for _ in range(int(m[1]) if m else 8)]
        row = [preset.prompt.replace(preset.stems[0], s) for s in preset.stems]
        cells, row_seeds, row_labels = [row] * len(seeds), seeds, [f"seed {s}" for s in seeds]
    else:
        cells = grid_cells(preset)
        row_seeds, row_labels = [preset.seed] * len(cells), [f"weight {w:g}" for w in preset.weights]
    out = []
    with ctx:
        for row, seed in zip(cells, row_seeds):
            for prompt in row:
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=shared.sd_model, prompt=prompt, negative_prompt=preset.negative_prompt, steps=preset.steps,
                    cfg_scale=preset.cfg_scale, width=preset.width, height=preset.height, seed=seed,
                    sampler_name=preset.sampler, do_not_save_grid=True, do_not_save_samples=True)
                p.override_settings = {"CLIP_stop_at_last_layers": preset.clip_skip}
                try:
                    processed = processing.process_images(p)
                finally:
                    p.close()
                out.append(processed.images[0])
    grid = images.image_grid(out, rows=len(cells))
    hor = [[images.GridAnnotation(s)] for s in preset.stems]
    ver = [[images.GridAnnotation(label)] for label in row_labels]
    return images.draw_grid_annotations(grid, out[0].width, out[0].height, hor, ver)
