"""The one entry both front ends call: config + host -> dataset -> latent cache -> network ->
optimizer/schedule -> loop -> saved epochs. Knows nothing of gradio or argparse.

Under the host's lock, the model is prepared (frozen) and always restored, whatever happens:
success, a stop request, or an exception.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .config import TrainConfig
from .dataset.captions import CaptionRules
from .dataset.dataset_config import resolve as resolve_dataset
from .dataset.folders import scan_dataset, scan_subsets, tag_frequency
from .dataset.train_data import TrainData
from .errors import ConfigError, TrainingDiverged, UserError
from .io.lora_file import NonFiniteWeights, load_lora, save_lora, zero_tensors
from .io.metadata import build_metadata, per_save
from .memory import MemoryWatch
from .networks.network import LoRANetwork
from .optim import build as build_optimizer, eval_mode, setting_problems, setting_warnings, train_mode, \
    warmup_steps
from .sampling import parse_prompts
from .train.checkpointing import gradient_checkpointing
from .train.compile import compiled_forward
from .train.loop import EpochHooks, LoopState, ResumePoint, StepSettings, run_epochs
from .train.precision import Precision
from .train.progress import Callbacks, Commands, Progress
from .train.text_cache import TextEncoderCache
from .train import state as train_state
from .train.tb_log import TBLogger

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a config will do on a dataset, before any model work (the dataset doctor's numbers)."""
    iterations_per_epoch: int
    steps_per_epoch: int          # optimizer steps
    epochs: int
    total_steps: int
    warmup_steps: int


@dataclass
class RunResult:
    files: List[Path] = field(default_factory=list)
    final_file: Optional[Path] = None
    epochs_done: int = 0
    steps_done: int = 0
    stopped: bool = False
    epoch_losses: List[tuple] = field(default_factory=list)
    step_losses: List[tuple] = field(default_factory=list)
    samples: List[Path] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    dataset_summary: List[str] = field(default_factory=list)


def plan(cfg: TrainConfig, data: TrainData, dist=None) -> Plan:
    """Steps per epoch are per process when several train together (each takes its share of the batches)."""
    micro = data.steps_per_epoch() if dist is None else dist.share_count(data.steps_per_epoch())
    per_epoch = max(1, math.ceil(micro / cfg.gradient_accumulation_steps))
    if cfg.max_train_epochs:
        epochs = cfg.max_train_epochs
        total = epochs * per_epoch
        if cfg.max_train_steps:
            total = min(total, cfg.max_train_steps)
    else:
        total = int(cfg.max_train_steps or 0)
        epochs = math.ceil(total / per_epoch)
    return Plan(data.scan.iterations_per_epoch, per_epoch, epochs, total, warmup_steps(cfg.lr_warmup_steps, total))


def build_data(cfg: TrainConfig) -> TrainData:
    cfg, subsets, notes = resolve_dataset(cfg)   # a dataset_config's / [[subsets]]' settings, or cfg as it is
    res = cfg.resolution_wh()
    min_side = cfg.min_bucket_reso if cfg.enable_bucket else min(res)
    scan = scan_subsets(subsets, min_side=min_side) if subsets else \
        scan_dataset(cfg.train_data_dir, cfg.caption_extension, min_side=min_side)
    scan.warnings[:0] = notes
    rules = CaptionRules(cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_dropout_rate, cfg.caption_tag_dropout_rate)
    return TrainData(scan, resolution=res, enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
                     max_bucket_reso=cfg.max_bucket_reso, bucket_reso_steps=cfg.bucket_reso_steps,
                     bucket_no_upscale=cfg.bucket_no_upscale, batch_size=cfg.train_batch_size,
                     caption_rules=rules, seed=cfg.seed)


def _create_lora(cfg: TrainConfig, host) -> LoRANetwork:
    na = cfg.network_args_dict()
    known = {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout"}
    unknown = sorted(set(na) - known)
    if unknown:
        raise UserError(f"network_args {unknown} are not understood by {cfg.network_module}; "
                        f"it takes {sorted(known)}.")
    conv_dim = int(na["conv_dim"]) if "conv_dim" in na else None
    conv_alpha = float(na.get("conv_alpha", 1.0)) if conv_dim else None
    net = LoRANetwork.create(
        host.unet if cfg.train_unet() else None, host.text_encoders if cfg.train_text_encoder() else [],
        dim=cfg.network_dim, alpha=cfg.network_alpha, conv_dim=conv_dim, conv_alpha=conv_alpha,
        dropout=cfg.network_dropout, rank_dropout=na.get("rank_dropout"), module_dropout=na.get("module_dropout"),
        unet_key_style="ldm" if host.model_kind == "sdxl" else "diffusers")
    return net


def _create_lycoris(cfg: TrainConfig, host):
    from .networks.lycoris_adapter import create_from_config
    return create_from_config(cfg, host)


def _create_dylora(cfg: TrainConfig, host):
    from .networks.dylora import create_from_config
    return create_from_config(cfg, host)


# network_module -> builder (each returns an object with LoRANetwork's training interface)
NETWORK_MODULES: Dict[str, Callable] = {
    "networks.lora": _create_lora,
    "lycoris.kohya": _create_lycoris,
    "networks.dylora": _create_dylora,
}


def create_network(cfg: TrainConfig, host) -> LoRANetwork:
    builder = NETWORK_MODULES.get(cfg.network_module)
    if builder is None:
        raise UserError(f"network_module {cfg.network_module!r} is not available: use one of "
                        f"{', '.join(NETWORK_MODULES)}.")
    return builder(cfg, host)


def network_problems(cfg: TrainConfig, host) -> List[str]:
    """network_module / network_args problems found before any model work."""
    if cfg.network_module not in NETWORK_MODULES:
        return [f"network_module {cfg.network_module!r} is not available: use one of {', '.join(NETWORK_MODULES)}."]
    try:
        na = cfg.network_args_dict()
        if cfg.network_module == "lycoris.kohya":
            from .networks.lycoris_adapter import config_problems
            return config_problems(na, cfg.network_dim, cfg.network_alpha, train_te=cfg.train_text_encoder(),
                                   text_encoders=host.text_encoders)
        if cfg.network_module == "networks.dylora":
            from .networks.dylora import settings
            settings(na, cfg.network_dim, cfg.network_alpha)
    except UserError as e:
        return [str(e)]
    return []


def epoch_file_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


OOM_MESSAGE = ("The GPU ran out of memory during training ({detail}). The model is restored and the memory freed. "
               "To fit: lower train_batch_size or resolution (max_bucket_reso), turn on gradient_checkpointing and "
               "cache_latents, use an 8-bit optimizer (AdamW8bit), train the UNet only with cache_text_encoder_outputs, "
               "or pick the preset for a smaller card.")


def _is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or \
        (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def train(cfg: TrainConfig, host, **kwargs) -> RunResult:
    """Train a LoRA as ``cfg`` says on ``host``. Raises :class:`UserError` for anything the user can fix.

    However a run ends, the model is restored (inside ``_train``); a run that fails leaves no folder it
    created empty behind; running out of GPU memory becomes a message naming what lowers memory."""
    from . import faults
    faults.arm()
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    existed = out_dir is None or out_dir.exists()
    detail = None
    try:
        return _train(cfg, host, **kwargs)
    except BaseException as e:
        if not existed:
            _remove_if_empty(out_dir)
        if not _is_oom(e):
            raise
        detail = str(e).splitlines()[0][:200]
    # outside the except block: the failed step's frames (and their GPU tensors) are released now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise UserError(OOM_MESSAGE.format(detail=detail))


def _remove_if_empty(folder: Path) -> None:
    try:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


def _train(cfg: TrainConfig, host, *, callbacks: Optional[Callbacks] = None, commands: Optional[Commands] = None,
           progress: Optional[Progress] = None, before_restore: Optional[Callable[[LoRANetwork], None]] = None,
           on_saved: Optional[Callable[[Path, Dict[str, str]], None]] = None, dist=None) -> RunResult:
    from .distributed import Dist
    dist = dist or Dist()
    main = dist.is_main
    cfg.validate()
    cfg = resolve_dataset(cfg)[0]   # a dataset_config's resolution, batch size ... apply to the whole run
    callbacks = callbacks or Callbacks()
    commands = commands or Commands()
    progress = progress or Progress()
    result = RunResult()
    progress.phase = "preparing"
    callbacks.progress(progress)

    data = build_data(cfg)
    result.dataset_summary = data.scan.summary_lines()
    result.warnings += data.scan.messages()
    for w in result.warnings:
        log.warning(w)
    progress.warnings = result.warnings   # the same list: later setting warnings show too
    pl = plan(cfg, data, dist)
    if pl.total_steps < 1:
        raise UserError("This run has no steps: raise max_train_epochs or max_train_steps.")
    problems = setting_problems(cfg, host.device, pl.total_steps) + network_problems(cfg, host)
    if problems:
        raise ConfigError(problems)
    for w in setting_warnings(cfg):
        log.warning(w)
        result.warnings.append(w)
    precision = Precision(cfg.mixed_precision, host.device)  # refuses what this device/torch can't do
    out_dir = Path(cfg.output_dir)
    state_file = train_state.state_path(out_dir, cfg.output_name)
    saved_state = None
    want = cfg.resume.strip()
    if want and want.lower() not in ("false", "no", "0"):   # JSON true/false reach this str field as "True"/"False"
        saved_state = train_state.load(state_file if want.lower() in ("auto", "latest", "true", "yes", "1")
                                       else Path(want))
        if saved_state.get("epoch", 1) > pl.epochs and saved_state.get("step", 0) >= pl.total_steps:
            raise UserError(f"The run already finished its {pl.epochs} epochs ({saved_state.get('step')} steps): raise "
                            "max_train_epochs (or max_train_steps) to train it further.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        _clean_stale_temp_files(out_dir)
    prompts = parse_prompts(cfg.sample_prompts, cfg.resolution_wh()) if cfg.sample_every_n_epochs else []

    torch.manual_seed(cfg.seed)
    started = time.time()
    tb = TBLogger(cfg.logging_dir if main else "", cfg.log_prefix)
    network = None
    with host.exclusive():
        host.prepare()
        watch = MemoryWatch(host.modules(), host.device)
        try:
            if cfg.cache_latents:
                progress.phase = "caching"
                callbacks.progress(progress)
                data.cache_latents(host.encode_images, host.vae_fingerprint() if cfg.cache_latents_to_disk else "",
                                   cfg.cache_latents_to_disk)
                data.move_latents(host.device)
                host.offload_vae()   # every latent is cached: the VAE leaves the GPU until samples or the end
            text_cache = None
            if cfg.cache_text_encoder_outputs:
                progress.phase = "caching"
                callbacks.progress(progress)
                varies = data.caption_rules.varies   # shuffled/dropped tags: variants rarely repeat, keep a few on the CPU
                text_cache = TextEncoderCache(host, max_token_length=cfg.max_token_length, clip_skip=cfg.clip_skip,
                                              autocast=precision.autocast, store_device="cpu" if varies else None,
                                              max_entries=4096 if varies else None)
                if not varies:   # every caption known now: encode all, free the GPU
                    text_cache.precompute(it.caption for it in data.items)
                    host.offload_text_encoders()
            network = create_network(cfg, host).to(host.device)
            if cfg.network_weights:
                sd, _ = load_lora(Path(cfg.network_weights))
                network.load_kohya_state_dict(sd)
            network.apply()
            groups = network.param_groups(cfg.effective_unet_lr(), cfg.effective_text_encoder_lr(),
                                          cfg.train_unet(), cfg.train_text_encoder())
            optimizer, schedule = build_optimizer(cfg, groups, total_steps=pl.total_steps, warmup=pl.warmup_steps)
            train_mode(optimizer)  # schedule-free optimizers: training weights; eval_mode() around saves/samples
            metadata = build_metadata(
                cfg, model_kind=host.model_kind, prediction_type=host.prediction_type, model_info=host.model_info(),
                dataset_dirs={c.folder: {"n_repeats": c.repeats, "img_count": c.images} for c in data.scan.concepts},
                tag_frequency=tag_frequency(data.items), bucket_info=data.bucket_info() if cfg.enable_bucket else None,
                num_train_images=pl.iterations_per_epoch, num_batches_per_epoch=data.steps_per_epoch(),
                num_epochs=pl.epochs, max_train_steps=pl.total_steps, warmup_steps=pl.warmup_steps,
                network_args=cfg.network_args_dict(),
                optimizer_desc=f"{type(optimizer).__module__}.{type(optimizer).__name__}"
                               + (f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else ""),
                started_at=started, zero_terminal_snr=bool(getattr(host, "zero_terminal_snr", False)))
            settings = StepSettings(
                clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length, noise_offset=cfg.noise_offset,
                multires_noise_iterations=cfg.multires_noise_iterations,
                multires_noise_discount=cfg.multires_noise_discount, min_snr_gamma=cfg.min_snr_gamma,
                train_text_encoder=cfg.train_text_encoder() and bool(network.te_names),
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
                scale_weight_norms=cfg.scale_weight_norms)
            progress.total_epochs = pl.epochs
            progress.total_steps = pl.total_steps
            saver = _Saver(cfg, network, metadata, out_dir, result, progress, on_saved)
            fingerprints = {"model": {k: v for k, v in host.model_info().items() if k in ("sd_model_name", "sd_model_hash")},
                            "vae": host.vae_fingerprint(), "network": train_state.network_shape(network),
                            "dataset": train_state.dataset_fingerprint(data.items)}
            resume_point = None
            if saved_state is not None:
                resume_point = _restore(saved_state, cfg, fingerprints, network, optimizer, schedule, precision,
                                        saver, result, progress, host.device)
            last_state_write = [time.time()]

            def on_checkpoint(epoch_at, batches_done, loop_state, caption_rng, stopping, flush):
                """Write the training state at epoch ends (stopping None), on Stop, and when the timer is due."""
                if not cfg.save_state or not main:
                    return
                timer = cfg.save_state_every_n_minutes
                due = stopping is None or stopping or (timer > 0 and time.time() - last_state_write[0] >= timer * 60)
                if not due:
                    return
                flush()
                _write_state(state_file, cfg, fingerprints, network, optimizer, schedule, precision, saver, progress,
                             epoch_at, batches_done, loop_state, caption_rng, pl, finished=False)
                last_state_write[0] = time.time()

            def on_epoch_end(epoch: int, steps: int) -> None:
                progress.memory = watch.sample()
                progress.memory_text = watch.text()
                with eval_mode(optimizer):
                    if not main:
                        pass
                    elif epoch % cfg.save_every_n_epochs == 0 or epoch == pl.epochs or steps >= pl.total_steps:
                        progress.phase = "saving"
                        callbacks.progress(progress)
                        saver.save_epoch(epoch, steps)
                    if main and prompts and epoch % cfg.sample_every_n_epochs == 0:
                        _samples(cfg, host, network, prompts, epoch, out_dir, result, progress, precision)
                progress.phase = "training"
                callbacks.progress(progress)

            compile_unet = cfg.torch_compile and getattr(host, "supports_compile", False)
            if cfg.torch_compile and not compile_unet:
                result.warnings.append("torch_compile is for the CLI: the WebUI's shared model is not compiled.")
            with gradient_checkpointing(host.checkpoint_blocks(), cfg.gradient_checkpointing), \
                    host.attention(cfg.sdpa), compiled_forward(host.unet, compile_unet, cfg.dynamo_backend):
                if resume_point is not None:   # every generator as it was at the saved point
                    train_state.set_rng_state(saved_state["rng"], random.Random())
                if dist.active:   # the same network everywhere (created above from one seed), different noise
                    torch.manual_seed(cfg.seed + 1000003 * dist.rank)
                state = run_epochs(host=host, network=network, data=data, optimizer=optimizer, schedule=schedule,
                                   precision=precision, s=settings, epochs=pl.epochs, total_steps=pl.total_steps,
                                   progress=progress, callbacks=callbacks, commands=commands,
                                   hooks=EpochHooks(on_epoch_end, on_checkpoint), tb=tb, seed=cfg.seed,
                                   encode_images=host.encode_images, text_cache=text_cache, resume=resume_point,
                                   dist=dist if dist.active else None, trace=_tracer(dist))
                _trace_network(dist, network)
            progress.memory = watch.sample()
            progress.memory_text = watch.text()
            result.steps_done = state.step
            result.stopped = progress.stopped
            result.epochs_done = len(progress.epoch_losses)
            result.epoch_losses = list(progress.epoch_losses)
            result.step_losses = list(progress.step_losses)
            with eval_mode(optimizer):
                if not result.stopped and main:
                    result.final_file = saver.save_final(result.epochs_done, state.step)
                    if cfg.save_state and state_file.is_file():   # finished: a later resume may add epochs
                        _mark_finished(state_file)
                progress.phase = "stopped" if result.stopped else "done"
                callbacks.progress(progress)
                if before_restore is not None:
                    before_restore(network)
        finally:
            if network is not None:
                network.remove()
            host.restore()
            tb.close()
            network = None
    return result


def _tracer(dist):
    """``LORA_TRAINER_TRACE=FILE``: every process appends the image indices of its batches, per epoch (tests)."""
    import os
    path = os.environ.get("LORA_TRAINER_TRACE")
    if not path:
        return None

    def trace(epoch, batches):
        import json
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": dist.rank, "epoch": epoch, "batches": [b.indices for b in batches]}) + "\n")
    return trace


def _trace_network(dist, network) -> None:
    import os
    path = os.environ.get("LORA_TRAINER_TRACE")
    if path:
        import hashlib
        import json
        h = hashlib.sha256()
        for k, v in sorted(network.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": dist.rank, "network": h.hexdigest()}) + "\n")


def _clean_stale_temp_files(out_dir: Path) -> None:
    """Temporary files an earlier crash left behind (atomic writes name them ``.<file>.<random>.tmp``)."""
    for p in out_dir.glob(".*.tmp"):
        try:
            p.unlink()
            log.info("removed %s, left by an interrupted write", p.name)
        except OSError:
            pass


def _write_state(path: Path, cfg: TrainConfig, fingerprints, network, optimizer, schedule, precision, saver,
                 progress: Progress, epoch_at: int, batches_done: int, loop_state: LoopState, caption_rng,
                 pl: Plan, finished: bool) -> None:
    st = {
        "config": cfg.to_dict(), "output_name": cfg.output_name, "fingerprints": fingerprints, "finished": finished,
        "epoch": epoch_at, "batches_done": batches_done, "step": loop_state.step, "total_steps": pl.total_steps,
        "epoch_sum": float(loop_state.epoch_sum) if loop_state.epoch_sum is not None else None,
        "epoch_count": loop_state.epoch_count,
        "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
        "rng": train_state.rng_state(caption_rng),
        "epoch_losses": list(progress.epoch_losses), "step_losses": list(progress.step_losses),
        "epoch_files": [str(p) for p in saver.epoch_files],
    }
    train_state.save(path, st)


def _mark_finished(path: Path) -> None:
    try:
        st = train_state.load(path)
        st.pop("path", None)
        st["finished"] = True
        train_state.save(path, st)
    except UserError:
        pass


def _restore(st, cfg: TrainConfig, fingerprints, network, optimizer, schedule, precision, saver, result: RunResult,
             progress: Progress, device) -> ResumePoint:
    """Put the saved state into this run (after checking it may continue from it)."""
    problems = train_state.compatibility_problems(
        st, config=cfg.to_dict(), model=fingerprints["model"], vae=fingerprints["vae"],
        network=fingerprints["network"], dataset=fingerprints["dataset"])
    if problems:
        raise ConfigError([f"cannot resume from {Path(st['path']).name}: {p}" for p in problems])
    network.load_state_dict({k: v.to(device) for k, v in st["network"].items()})
    optimizer.load_state_dict(st["optimizer"])
    schedule.load_state_dict(st["schedule"])
    if precision.scaler is not None and st.get("scaler"):
        precision.scaler.load_state_dict(st["scaler"])
    saver.epoch_files = [Path(p) for p in st.get("epoch_files", []) if Path(p).is_file()]
    result.files += saver.epoch_files
    progress.files += [str(p) for p in saver.epoch_files]
    progress.epoch_losses += [tuple(x) for x in st.get("epoch_losses", [])]
    progress.step_losses += [tuple(x) for x in st.get("step_losses", [])]
    loop = LoopState(step=st["step"], micro_step=0, epoch_count=st.get("epoch_count", 0),
                     epoch_sum=torch.tensor(st["epoch_sum"], device=device) if st.get("epoch_sum") is not None else None)
    log.info("resuming from %s: epoch %d, %d batches into it, step %d", st["path"], st["epoch"], st["batches_done"],
             st["step"])
    return ResumePoint(epoch=st["epoch"], batches_done=st["batches_done"], loop=loop,
                       caption_rng_state=train_state._tuplify(st["rng"]["python_caption"]))


class _Saver:
    def __init__(self, cfg: TrainConfig, network: LoRANetwork, metadata: Dict[str, str], out_dir: Path,
                 result: RunResult, progress: Progress, on_saved):
        self.cfg, self.network, self.metadata, self.out_dir = cfg, network, metadata, out_dir
        self.result, self.progress, self.on_saved = result, progress, on_saved
        self.epoch_files: List[Path] = []

    def _write(self, stem: str, epoch: int, steps: int) -> Path:
        tensors = self.network.kohya_state_dict()
        path = self.out_dir / f"{stem}.safetensors"
        try:
            meta = save_lora(path, tensors, per_save(self.metadata, output_name=stem, epoch=epoch, steps=steps),
                             self.cfg.save_precision)
        except NonFiniteWeights as e:
            raise TrainingDiverged(str(e)) from None
        zeros = zero_tensors(tensors)
        if zeros:
            log.info("%s: %d of %d tensors are all zero (untrained layers: with clip_skip > 1 the last "
                     "text-encoder layers get no gradient; many more mean fp16 underflow; `python -m lora_trainer "
                     "check` explains each)", path.name, len(zeros), sum(v.numel() > 1 for v in tensors.values()))
        self.result.files.append(path)
        self.progress.files.append(str(path))
        if self.on_saved is not None:
            try:
                self.on_saved(path, meta)
            except Exception:
                log.exception("on_saved callback failed for %s", path)
        return path

    def save_epoch(self, epoch: int, steps: int) -> Path:
        path = self._write(epoch_file_name(self.cfg.output_name, epoch), epoch, steps)
        self.epoch_files.append(path)
        keep = self.cfg.save_last_n_epochs
        while keep and len(self.epoch_files) > keep:
            old = self.epoch_files.pop(0)
            try:
                old.unlink()
                self.result.files.remove(old)
                self.progress.files.remove(str(old))
            except (OSError, ValueError):
                pass
        return path

    def save_final(self, epoch: int, steps: int) -> Path:
        return self._write(self.cfg.output_name, epoch, steps)


def _samples(cfg, host, network, prompts, epoch, out_dir: Path, result: RunResult, progress: Progress,
             precision: Precision) -> None:
    """Preview images with the network applied. A failure is logged, never raised: saves come first."""
    if not getattr(host, "supports_sampling", False):
        return
    progress.phase = "sampling"
    offloaded = host.reload_offloaded() if hasattr(host, "reload_offloaded") else []   # samples need them
    try:
        network.eval()
        images = host.sample(prompts, max_token_length=cfg.max_token_length, clip_skip=cfg.clip_skip,
                             seed=cfg.seed, autocast=precision.autocast())
        d = out_dir / "sample"
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            p = d / f"{cfg.output_name}_e{epoch:06d}_{i:02d}.png"
            im.save(p)
            result.samples.append(p)
            progress.samples.append(str(p))
    except Exception as e:
        log.warning("sample images for epoch %d failed (%s: %s); training goes on", epoch, type(e).__name__, e)
        result.warnings.append(f"samples for epoch {epoch} failed: {e}")
    finally:
        network.train()
        if "text_encoders" in offloaded:
            host.offload_text_encoders()
        if "vae" in offloaded:
            host.offload_vae()
