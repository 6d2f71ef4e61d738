"""The dataset doctor: what a dataset folder holds and what the current settings will do with it,
checked against the guide's advice, before any model work.

``diagnose(cfg)`` never raises for a bad dataset: an unusable folder becomes a report whose ``error``
says what is wrong and how to fix it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .config import TrainConfig
from .errors import UserError

# The guide's numbers [Подготовка датасета], [--max_train_steps].
MIN_IMAGES = {"character": 50, "style": 75}
GOOD_IMAGES = {"character": (50, 100), "style": (75, 150)}
PER_EPOCH = (200, 600)
PER_EPOCH_BY_SUBJECT = {"character": (300, 500), "style": (400, 600)}
TOTAL = {"character": (2000, 7000), "style": (8000, 12000)}
TOP_TAGS = 8


@dataclass
class ConceptReport:
    folder: str
    name: str
    repeats: int
    images: int
    iterations: int                 # repeats x images
    without_caption: int            # no caption file: trains with the folder's name
    empty_captions: int
    caption_sample: str
    top_tags: List[Tuple[str, int]]  # (tag, images with it), most frequent first
    missing_trigger: int = 0


@dataclass
class DoctorReport:
    root: str
    subject: str                    # "character" or "style": which of the guide's numbers apply
    error: Optional[str] = None
    concepts: List[ConceptReport] = field(default_factory=list)
    images: int = 0
    iterations_per_epoch: int = 0
    batch_size: int = 1
    steps_per_epoch: int = 0
    epochs: int = 0
    total_steps: int = 0
    total_image_iterations: int = 0  # before dividing by batch size, as the guide counts
    triggers: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_markdown(self) -> str:
        if self.error:
            return f"**Dataset problem** in `{self.root or '(no folder)'}`\n\n❌ {self.error}"
        lines = [f"**Dataset** `{self.root}`: {self.images} images in {len(self.concepts)} concept folder"
                 f"{'s' if len(self.concepts) != 1 else ''} (checked as a **{self.subject}**)", "",
                 "| folder | repeats | images | iterations | no caption | trigger missing | most frequent tags |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for c in self.concepts:
            tags = ", ".join(f"{_md(t)} ({n})" for t, n in c.top_tags) or "-"
            lines.append(f"| {_md(c.folder)} | {c.repeats} | {c.images} | {c.iterations} | "
                         f"{c.without_caption + c.empty_captions or ''} | {c.missing_trigger or ''} | {tags} |")
        lines.append("")
        for c in self.concepts:
            lines.append(f"- caption sample from {_md(c.folder)}: *{_md(_clip(c.caption_sample, 160))}*")
        lines += ["", f"**{self.iterations_per_epoch}** image-iterations per epoch (Σ repeats × images) → "
                      f"**{self.steps_per_epoch}** steps per epoch at batch {self.batch_size}; "
                      f"**{self.epochs}** epochs = **{self.total_steps}** steps, "
                      f"**{self.total_image_iterations}** image-iterations in all."]
        if self.triggers:
            lines.append(f"Trigger words (kept first tags): {', '.join(f'`{t}`' for t in self.triggers)}")
        if self.warnings:
            lines += [""] + [f"- ⚠️ {_md(w)}" for w in self.warnings]
        else:
            lines += ["", "✅ Nothing to warn about."]
        if self.notes:  # a paragraph, not a list: a second list right after the first would merge with it
            lines += ["", " ".join(_md(n) for n in self.notes)]
        return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def guess_subject(cfg: TrainConfig) -> str:
    """The guide keeps a character's trigger tag first (keep_tokens >= 1) and keeps none for styles."""
    return "character" if cfg.keep_tokens > 0 else "style"


def diagnose(cfg: TrainConfig, subject: Optional[str] = None, model_kind: Optional[str] = None) -> DoctorReport:
    """``model_kind`` (sd1/sd2/sdxl: the loaded model's, when known) adds that kind's resolution checks."""
    from .dataset.folders import tag_frequency
    from .dataset.triggers import missing_trigger, trigger_words
    from .run import build_data, plan

    from .dataset.dataset_config import describe, resolve
    report = DoctorReport(root=describe(cfg), subject="", batch_size=cfg.train_batch_size)
    try:
        cfg = resolve(cfg)[0]   # a dataset_config's / [[subsets]]' settings (keep_tokens, batch size ...)
        report.batch_size = cfg.train_batch_size
        data = build_data(cfg)
        pl = plan(cfg, data)
    except UserError as e:  # DatasetError, a bad resolution, a refused subset ...
        report.error = str(e)
        return report
    finally:
        report.subject = subject if subject in MIN_IMAGES else guess_subject(cfg)
    scan = data.scan
    report.images = len(scan.items)
    report.iterations_per_epoch = pl.iterations_per_epoch
    report.steps_per_epoch = pl.steps_per_epoch
    report.epochs = pl.epochs
    report.total_steps = pl.total_steps
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    report.total_image_iterations = min(pl.iterations_per_epoch * pl.epochs, pl.total_steps * per_step) \
        if pl.total_steps else 0

    report.triggers = trigger_words(scan.items, cfg.keep_tokens)
    missing = missing_trigger(scan.items, report.triggers)
    freq = tag_frequency(scan.items)
    for c in scan.concepts:
        items = [it for it in scan.items if it.concept == c.folder]
        sample = next((it.caption for it in items if it.caption_source == "file"), items[0].caption if items else "")
        top = Counter(freq.get(c.folder, {})).most_common(TOP_TAGS)
        report.concepts.append(ConceptReport(c.folder, c.name, c.repeats, c.images, c.repeats * c.images,
                                             c.missing_captions, c.empty_captions, sample, top,
                                             missing.get(c.folder, 0)))
    _warn(report, cfg, data)
    _warn_model_kind(report, cfg, model_kind)
    return report


def _warn_model_kind(r: DoctorReport, cfg: TrainConfig, model_kind: Optional[str]) -> None:
    w, h = cfg.resolution_wh()
    side = (w * h) ** 0.5
    if model_kind == "sdxl":
        if side < 1024:
            r.warnings.append(f"The loaded model is SDXL, trained at 1024x1024; at resolution {cfg.resolution} the LoRA "
                              "learns blurry, low-detail images. Set resolution 1024 with buckets 512-2048 (the SDXL "
                              "presets do).")
        if cfg.train_text_encoder() and not cfg.cache_text_encoder_outputs:
            r.notes.append("SDXL with both text encoders trained needs several GB more than UNet-only training "
                           "with cached text-encoder outputs (network_train_unet_only + cache_text_encoder_outputs).")
    elif model_kind in ("sd1", "sd2") and side > 768:
        r.warnings.append(f"The loaded model is {model_kind.upper()}, trained at 512-768 px; resolution "
                          f"{cfg.resolution} is an SDXL size: use 512-768 (or load an SDXL model).")


def _warn(r: DoctorReport, cfg: TrainConfig, data) -> None:
    w = r.warnings
    lo = MIN_IMAGES[r.subject]
    good = GOOD_IMAGES[r.subject]
    if r.images < lo:
        w.append(f"Only {r.images} images: the guide suggests {good[0]}-{good[1]} for a {r.subject}. "
                 "Add more varied images if you can.")
    a, b = PER_EPOCH
    sa, sb = PER_EPOCH_BY_SUBJECT[r.subject]
    if not a <= r.iterations_per_epoch <= b:
        direction = "raise" if r.iterations_per_epoch < a else "lower"
        w.append(f"{r.iterations_per_epoch} image-iterations per epoch is outside {a}-{b} "
                 f"({sa}-{sb} for a {r.subject}): {direction} the repeats (the N in N_name).")
    ta, tb = TOTAL[r.subject]
    if r.total_image_iterations and not ta <= r.total_image_iterations <= tb:
        direction = "more" if r.total_image_iterations < ta else "fewer"
        per = r.iterations_per_epoch or 1
        suggest = max(1, round((ta + tb) / 2 / per))
        w.append(f"{r.total_image_iterations} image-iterations in all is outside the guide's {ta}-{tb} for a "
                 f"{r.subject}: train {direction} epochs (about {suggest} at {per} per epoch).")
    if r.triggers:
        for c in r.concepts:
            if c.missing_trigger:
                w.append(f"{c.folder}: {c.missing_trigger} of {c.images} captions lack the trigger word "
                         f"({', '.join(r.triggers)}): put it first in every caption.")
    elif cfg.keep_tokens > 0 and r.subject == "character":
        w.append(f"keep_tokens = {cfg.keep_tokens} but the captions share no first tag: put a unique trigger "
                 "word first in every caption of the character.")
    upscaled = _upscaled(data)
    if upscaled:
        (path, size, bucket, factor), count = upscaled[0], len(upscaled)
        w.append(f"{count} images are smaller than their training size and will be upscaled, e.g. {path} "
                 f"{size[0]}x{size[1]} trains at {bucket[0]}x{bucket[1]} ({factor:.1f}x). Use larger images or a "
                 f"lower resolution (now {cfg.resolution}).")
    # the scan's own findings (skipped files, captions, layout), worded exactly as a training run reports them;
    # its small-image line is replaced by the upscaling one above
    w += [s for s in data.scan.messages() if "smaller than the smallest bucket" not in s]
    if cfg.enable_bucket:
        r.notes.append(f"{len(data.bucket_counts())} aspect-ratio buckets in use.")


def _upscaled(data) -> List[tuple]:
    """Images whose training bucket is larger than the image (scale to cover the bucket > 1)."""
    out = []
    for it, (bw, bh) in zip(data.items, data.item_bucket):
        w, h = it.size
        factor = max(bw / w, bh / h)
        if factor > 1.0:
            out.append((f"{it.path.parent.name}/{it.path.name}", it.size, (bw, bh), factor))
    out.sort(key=lambda t: -t[3])
    return out
