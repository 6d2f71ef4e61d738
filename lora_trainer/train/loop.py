"""The training step and the epoch loop.

The step reads top to bottom: encode captions, noise, predict, target by prediction type, loss,
backward; every ``gradient_accumulation_steps`` micro-steps: unscale, clip, optimizer step,
schedule, max-norm. Nothing in a step waits on the device: losses stay on the device and are read
in blocks (``sync_every``), so the step can later be captured whole (CUDA graphs, torch.compile).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

from .. import faults
from .noise import add_noise, make_noise, min_snr_weight, per_sample_mse, target_for
from .precision import Precision
from .progress import Callbacks, Commands, Progress

log = logging.getLogger(__name__)


@dataclass
class StepSettings:
    clip_skip: int = 1
    max_token_length: int = 75
    noise_offset: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    min_snr_gamma: Optional[float] = None
    train_text_encoder: bool = True
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    scale_weight_norms: Optional[float] = None


@dataclass
class LoopState:
    step: int = 0                 # optimizer steps done
    micro_step: int = 0
    pending: List[tuple] = field(default_factory=list)   # (step, loss tensor) not yet read back
    epoch_sum: Optional[torch.Tensor] = None
    epoch_count: int = 0
    norm_stats: Optional[tuple] = None


def train_step(host, precision: Precision, s: StepSettings, latents: torch.Tensor, tokens: Any = None, *,
               cond: Any = None, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward and backward of one micro-batch. Returns the (unscaled) loss, still on the device.
    ``cond``: conditioning already encoded (cached text-encoder outputs) instead of ``tokens``;
    ``time_ids``: SDXL's size conditioning per image (original size, crop, target size)."""
    acp = host.alphas_cumprod
    if cond is None:
        te_grad = torch.enable_grad() if s.train_text_encoder else torch.no_grad()
        with te_grad, precision.autocast():
            cond = host.encode_tokens(tokens, s.clip_skip)
    if time_ids is not None and isinstance(cond, dict):
        cond = dict(cond, time_ids=time_ids.to(latents.device))
    noise = make_noise(latents, noise_offset=s.noise_offset, multires_iterations=s.multires_noise_iterations,
                       multires_discount=s.multires_noise_discount)
    timesteps = torch.randint(0, acp.shape[0], (latents.shape[0],), device=latents.device)
    noisy = add_noise(latents, noise, timesteps, acp)
    with precision.autocast():
        pred = host.denoise(noisy, timesteps, cond)
    target = target_for(host.prediction_type, latents, noise, timesteps, acp)
    faults.maybe_raise("step")
    loss = per_sample_mse(pred, target)
    if faults.hit("loss") == "nan":
        loss = loss * float("nan")
    if s.min_snr_gamma:
        loss = loss * min_snr_weight(timesteps, acp, s.min_snr_gamma, host.prediction_type)
    loss = loss.mean()
    precision.backward(loss / s.gradient_accumulation_steps)
    return loss.detach()


def optimizer_step(network, optimizer, schedule, precision: Precision, params: List[torch.nn.Parameter],
                   s: StepSettings, dist=None):
    if dist is not None:   # several processes: the average of everyone's gradients
        dist.average_gradients(params)
    precision.unscale(optimizer)
    if s.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    precision.step(optimizer)
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if s.scale_weight_norms:
        return network.apply_max_norm(s.scale_weight_norms)
    return None


@dataclass
class EpochHooks:
    """What happens between epochs (saving, samples) and between steps (training-state checkpoints):
    supplied by run.py. ``on_checkpoint(epoch, batches_done, state, caption_rng, stopping, flush=)`` is
    called at accumulation boundaries and epoch ends (``stopping`` None); it decides itself whether to
    write (timer, Stop, epoch end), calling ``flush()`` first to read pending losses back."""
    on_epoch_end: Callable[[int, int], None]
    on_checkpoint: Optional[Callable[..., None]] = None


@dataclass
class ResumePoint:
    """Where a resumed run continues: ``epoch`` is the epoch in progress (its first ``batches_done``
    batches are done), the loop state and caption generator as they were then."""
    epoch: int
    batches_done: int
    loop: LoopState
    caption_rng_state: Any = None


def run_epochs(*, host, network, data, optimizer, schedule, precision: Precision, s: StepSettings, epochs: int,
               total_steps: int, progress: Progress, callbacks: Callbacks, commands: Commands, hooks: EpochHooks,
               tb=None, seed: int = 0, sync_every: int = 10, encode_images=None, text_cache=None,
               resume: Optional[ResumePoint] = None, dist=None, trace=None) -> LoopState:
    state = resume.loop if resume is not None else LoopState()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    caption_rng = random.Random(seed)
    if resume is not None and resume.caption_rng_state is not None:
        caption_rng.setstate(resume.caption_rng_state)
    first_epoch = resume.epoch if resume is not None else 1
    t0 = time.time()
    network.train()
    optimizer.zero_grad(set_to_none=True)
    progress.phase = "training"
    stop = False
    checkpoint_hook = hooks.on_checkpoint

    def checkpoint(epoch_at, batches_done, st, rng, stopping):
        if checkpoint_hook is not None:
            checkpoint_hook(epoch_at, batches_done, st, rng, stopping,
                            flush=lambda: _flush(st, progress, optimizer, tb))
    for epoch in range(first_epoch, epochs + 1):
        progress.epoch = epoch
        skip = resume.batches_done if (resume is not None and epoch == resume.epoch) else 0
        if not skip:
            state.epoch_sum, state.epoch_count = None, 0
        batches = data.epoch_batches(epoch) if dist is None else dist.shard(data.epoch_batches(epoch))
        if trace is not None:
            trace(epoch, batches)
        for index, batch in enumerate(batches):
            if index < skip:
                continue
            if state.step >= total_steps:
                break
            latents = data.batch_latents(batch, encode_images).to(host.device)
            captions = data.batch_captions(batch, caption_rng)
            time_ids = data.batch_size_conditioning(batch) if host.model_kind == "sdxl" else None
            if text_cache is not None:
                loss = train_step(host, precision, s, latents, cond=text_cache.encode(captions, host.device),
                                  time_ids=time_ids)
            else:
                loss = train_step(host, precision, s, latents, host.tokenize(captions, s.max_token_length),
                                  time_ids=time_ids)
            state.micro_step += 1
            state.epoch_sum = loss if state.epoch_sum is None else state.epoch_sum + loss
            state.epoch_count += 1
            boundary = state.micro_step % s.gradient_accumulation_steps == 0
            if boundary:
                stats = optimizer_step(network, optimizer, schedule, precision, params, s, dist)
                state.step += 1
                state.pending.append((state.step, loss, stats))
                if state.step % sync_every == 0:
                    _flush(state, progress, optimizer, tb)
                    _report(progress, state, total_steps, t0, callbacks)
            # a stop takes effect at an accumulation boundary, where the state is complete
            if boundary:
                stop = commands.stop_requested()
                if stop:
                    _flush(state, progress, optimizer, tb)
                checkpoint(epoch, index + 1, state, caption_rng, stop)
                if stop:
                    break
        if state.micro_step % s.gradient_accumulation_steps:  # an epoch's last partial accumulation
            stats = optimizer_step(network, optimizer, schedule, precision, params, s, dist)
            state.step += 1
            state.pending.append((state.step, loss, stats))
            state.micro_step = 0
        _flush(state, progress, optimizer, tb)
        if stop:
            progress.message = f"stopped during epoch {epoch}; epochs before it are saved"
            _report(progress, state, total_steps, t0, callbacks)
            break
        if state.epoch_count:
            mean = (state.epoch_sum / state.epoch_count).item()
            progress.epoch_loss = mean
            progress.epoch_losses.append((epoch, mean))
            if tb is not None:
                tb.scalar("loss/epoch", mean, epoch)
        _report(progress, state, total_steps, t0, callbacks)
        hooks.on_epoch_end(epoch, state.step)
        stop = commands.stop_requested()   # asked during the epoch's last partial accumulation: after the epoch
        checkpoint(epoch + 1, 0, state, caption_rng, None)   # None: an epoch end (always written)
        if stop or state.step >= total_steps:
            break
    progress.stopped = stop
    return state


def _flush(state: LoopState, progress: Progress, optimizer, tb) -> None:
    """Read the pending losses back from the device in one transfer."""
    if not state.pending:
        return
    steps = [p[0] for p in state.pending]
    losses = torch.stack([p[1].float() for p in state.pending]).cpu().tolist()
    bad = next((st for st, lo in zip(steps, losses) if not math.isfinite(lo)), None)
    if bad is not None:
        from ..errors import TrainingDiverged
        state.pending.clear()
        raise TrainingDiverged(
            f"The loss became NaN/Inf at step {bad}: the run stopped and nothing from that point on was saved; the "
            "epoch files written before are intact (and the training state is the last good one). Lower the learning "
            "rate, use bf16 instead of fp16, or set max_grad_norm = 1.")
    stats = [p[2] for p in state.pending if p[2] is not None]
    state.pending.clear()
    lrs = [g["lr"] for g in optimizer.param_groups]
    for st, lo in zip(steps, losses):
        progress.step_losses.append((st, lo))
        if tb is not None:
            tb.scalar("loss/current", lo, st)
    if tb is not None:
        for g, lr in zip(optimizer.param_groups, lrs):
            tb.scalar(f"lr/{g.get('name', 'group')}", lr, steps[-1])
            if "d" in g:  # adaptive optimizers (D-Adaptation, Prodigy)
                tb.scalar(f"lr/d*lr/{g.get('name', 'group')}", g["d"] * lr, steps[-1])
    progress.loss = losses[-1]
    progress.lr = lrs[-1] if lrs else None
    if stats:
        keys_scaled, mean_norm, max_norm = (float(x) for x in stats[-1])
        progress.message = f"average key norm {mean_norm:.4f}, keys scaled {int(keys_scaled)}"
        if tb is not None:
            tb.scalar("max_norm/keys_scaled", keys_scaled, steps[-1])
            tb.scalar("max_norm/average_key_norm", mean_norm, steps[-1])
            tb.scalar("max_norm/max_key_norm", max_norm, steps[-1])


def _report(progress: Progress, state: LoopState, total_steps: int, t0: float, callbacks: Callbacks) -> None:
    progress.step = state.step
    progress.total_steps = total_steps
    progress.elapsed = time.time() - t0
    if state.step:
        progress.eta = progress.elapsed / state.step * max(0, total_steps - state.step)
    callbacks.progress(progress)
