"""sd-scripts' dataset config (``dataset_config = "dataset.toml"``: ``[general]``, ``[[datasets]]``,
``[[datasets.subsets]]``) and LoRA_Easy's top-level ``[[subsets]]`` in a training TOML.

Each subset becomes a concept: its ``image_dir`` needs no ``N_`` prefix, ``num_repeats`` is its repeats
(default 1) and ``class_tokens`` the caption of images without a caption file (else the folder's name).
Values fall back as sd-scripts' do: subset -> dataset -> ``[general]`` -> the training config. What this
trainer cannot do is refused with the reason, before any model work.

Facts (kohya-ss/sd-scripts ``library/config_util.py``): subset keys are the DreamBooth ones (``image_dir``,
``num_repeats``, ``class_tokens``, ``caption_extension``, ``is_reg``, caption and augmentation options);
``metadata_file`` marks a fine-tuning subset and ``conditioning_data_dir`` a ControlNet one; dataset keys are
``resolution``, ``batch_size`` and the bucket options; ``[general]`` and a dataset may hold subset keys too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError, UserError


@dataclass
class SubsetConfig:
    """One subset as the config holds it (``None``: not given, the dataset/general/training value applies)."""
    image_dir: str = ""
    num_repeats: Optional[int] = None
    class_tokens: Optional[str] = None
    caption_extension: Optional[str] = None
    keep_tokens: Optional[int] = None
    shuffle_caption: Optional[bool] = None
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: Optional[float] = None
    caption_tag_dropout_rate: Optional[float] = None
    # sd-scripts subset keys this trainer does not support: kept (so a file round-trips), refused when set
    other: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        d.update(self.other)
        return {k: v for k, v in d.items() if v is not None}


_TYPES = {"image_dir": str, "num_repeats": int, "class_tokens": str, "caption_extension": str, "keep_tokens": int,
          "shuffle_caption": bool, "caption_prefix": str, "caption_suffix": str, "caption_dropout_rate": float,
          "caption_tag_dropout_rate": float}
# sd-scripts' other subset keys and the value that means "off"; a different value is refused with the reason
_UNSUPPORTED = {
    "is_reg": (False, "regularisation images are not supported (the guide advises against them for LoRAs): "
                      "remove this subset, or set is_reg = false to train its images as a concept"),
    "flip_aug": (False, "horizontal flip augmentation is not implemented: remove it (or set flip_aug = false); "
                        "to train mirrored images, add flipped copies to the folder"),
    "conditioning_data_dir": (None, "ControlNet datasets are not supported: this trainer trains LoRAs on "
                                    "image/caption pairs only"),
    "metadata_file": (None, "fine-tuning datasets (captions in a metadata .json) are not supported: put a "
                            "caption file next to each image and use image_dir"),
    "color_aug": (False, "colour augmentation is not implemented: remove it"),
    "random_crop": (False, "random crop is not implemented: remove it (images are resized to their bucket)"),
    "face_crop_aug_range": (None, "face crop augmentation is not implemented: remove it"),
    "caption_separator": (",", "tags are separated by ',' here: remove it"),
    "keep_tokens_separator": ("", "not supported: use keep_tokens"),
    "secondary_separator": (None, "not supported: remove it"),
    "enable_wildcard": (False, "caption wildcards are not supported: remove it"),
    "caption_dropout_every_n_epochs": (0, "not supported: use caption_dropout_rate"),
    "token_warmup_min": (1, "token warm-up is not supported: remove it"),
    "token_warmup_step": (0, "token warm-up is not supported: remove it"),
    "custom_attributes": (None, "not supported: remove it"),
    "cache_info": (False, "not needed: the dataset scan is cached already; remove it"),
    "alpha_mask": (False, "alpha-mask loss is not supported: remove it (transparent areas train as white)"),
    "validation_seed": (None, "validation sets are not supported: remove it"),
    "validation_split": (0, "validation sets are not supported: remove it"),
    "resize_interpolation": (None, "not supported: remove it (images are resized with Lanczos)"),
}
SUBSET_KEYS = set(_TYPES) | set(_UNSUPPORTED)
# dataset-level keys -> the training config's field
DATASET_KEYS = {"resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
                "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
                "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale"}
_UNSUPPORTED_DATASET = {"network_multiplier": (1.0, "not supported: remove it (the multiplier is 1 while training)"),
                        "debug_dataset": (False, "not supported: use the dataset doctor (--check) instead")}
# per-subset caption settings this trainer applies to the whole run: all subsets must agree
SHARED_CAPTION_KEYS = ("keep_tokens", "shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate")


def _check_type(key: str, value: Any, where: str, problems: List[str]) -> Any:
    t = _TYPES[key]
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        problems.append(f"{where}: {key} = {value!r} must be {'a whole number' if t is int else t.__name__}.")
        return None
    return value


def parse_subset(d: Any, where: str, problems: List[str]) -> Optional[SubsetConfig]:
    """A subset table as a :class:`SubsetConfig`; a problem (naming ``where``) for each bad key or value."""
    if not isinstance(d, dict):
        problems.append(f"{where} = {d!r}: a subset is a table with image_dir, e.g. "
                        "[[subsets]] image_dir = \"/data/mychar\" num_repeats = 10.")
        return None
    s = SubsetConfig()
    for key, value in d.items():
        if key in _TYPES:
            setattr(s, key, _check_type(key, value, where, problems))
        elif key in _UNSUPPORTED:
            s.other[key] = value
        else:
            hint = (f" ({key} is a dataset setting: put it in [[datasets]] or [general], or set it in the training "
                    "config)" if key in DATASET_KEYS else "")
            problems.append(f"{where}: unknown subset key {key!r}{hint}. Subset keys are: "
                            f"{', '.join(sorted(_TYPES))}.")
    return s


def parse_subsets(value: Any) -> List[SubsetConfig]:
    """The config's inline ``subsets`` (LoRA_Easy's ``[[subsets]]``); raises ValueError naming each problem."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("write [[subsets]] tables, each with image_dir (and num_repeats, class_tokens ...)")
    problems: List[str] = []
    out = [s for i, d in enumerate(value) if (s := parse_subset(d, f"subsets[{i}]", problems)) is not None]
    if problems:
        raise ValueError("; ".join(problems))
    return out


# ------------------------------------------------------------------ the resolved dataset
@dataclass
class Subset:
    """A subset ready to scan: every value decided."""
    image_dir: Path
    repeats: int
    fallback_caption: Optional[str]   # class_tokens; None: the folder's name
    caption_extension: str
    caption_prefix: str = ""
    caption_suffix: str = ""


def _read_toml(path: Path) -> Dict[str, Any]:
    from ..io.toml_text import TOMLDecodeError, loads_toml
    if not path.is_file():
        raise UserError(f"dataset_config {str(path)!r} does not exist: point it at sd-scripts' dataset TOML "
                        "(with [[datasets]] and [[datasets.subsets]]), or leave it empty and set train_data_dir.")
    try:
        return loads_toml(path.read_text(encoding="utf-8"))
    except (TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"dataset_config {str(path)!r} is not valid TOML: {e}") from None


def _norm_resolution(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        return str(int(v[0]))
    if isinstance(v, (list, tuple)):
        return ",".join(str(int(x)) for x in v)
    return str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def read_dataset_config(path: Path) -> Tuple[List[SubsetConfig], Dict[str, Any]]:
    """(subsets with dataset and [general] values filled in, dataset-level settings) from sd-scripts' file."""
    data = _read_toml(path)
    problems: List[str] = []
    name = path.name
    for key in data:
        if key not in ("general", "datasets"):
            problems.append(f"{name}: unknown top-level key {key!r}: a dataset config holds [general] and "
                            "[[datasets]] (with [[datasets.subsets]]).")
    general = data.get("general", {}) or {}
    datasets = data.get("datasets", []) or []
    if not isinstance(general, dict) or not isinstance(datasets, list):
        raise ConfigError([f"{name}: [general] must be a table and datasets a list of [[datasets]] tables."])
    if not datasets:
        problems.append(f"{name} has no [[datasets]]: add one with [[datasets.subsets]] image_dir = \"...\".")
    subsets: List[SubsetConfig] = []
    levels: List[Dict[str, Any]] = []
    for i, ds in enumerate(datasets):
        where = f"{name} datasets[{i}]"
        if not isinstance(ds, dict):
            problems.append(f"{where} must be a table.")
            continue
        level: Dict[str, Any] = {}
        inherited: Dict[str, Any] = {}
        for src, table in (("[general]", general), (where, ds)):
            for key, value in table.items():
                if key == "subsets" and table is ds:
                    continue
                if key in DATASET_KEYS:
                    level[key] = _norm_resolution(value) if key == "resolution" else value
                elif key in _UNSUPPORTED_DATASET:
                    if value != _UNSUPPORTED_DATASET[key][0]:
                        problems.append(f"{src}: {key} = {value!r}: {_UNSUPPORTED_DATASET[key][1]}.")
                elif key in SUBSET_KEYS:
                    inherited[key] = value
                elif key not in ("prior_loss_weight", "max_token_length"):  # argparse-level in sd-scripts
                    problems.append(f"{src}: unknown key {key!r}. Dataset keys are: {', '.join(sorted(DATASET_KEYS))}; "
                                    f"subset keys: {', '.join(sorted(_TYPES))}.")
        levels.append(level)
        subs = ds.get("subsets", [])
        if not isinstance(subs, list) or not subs:
            problems.append(f"{where} has no [[datasets.subsets]]: add one with image_dir = \"...\".")
            continue
        for j, sd in enumerate(subs):
            merged = {**inherited, **sd} if isinstance(sd, dict) else sd
            s = parse_subset(merged, f"{where}.subsets[{j}]", problems)
            if s is not None:
                subsets.append(s)
    for i, level in enumerate(levels[1:], start=1):
        for key in sorted(set(level) | set(levels[0])):
            if level.get(key) != levels[0].get(key):
                problems.append(f"{name}: datasets[0] and datasets[{i}] differ in {key} ({levels[0].get(key)!r} vs "
                                f"{level.get(key)!r}): this trainer trains one dataset per run. Put all subsets in one "
                                "[[datasets]] with one setting (e.g. one resolution; buckets handle other sizes), or "
                                "train a run per dataset.")
    if problems:
        raise ConfigError(problems)
    return subsets, (levels[0] if levels else {})


def _subset_problems(subsets: List[SubsetConfig], where: str) -> List[str]:
    p = []
    for i, s in enumerate(subsets):
        label = f"{where}[{i}] ({s.image_dir or 'no image_dir'})"
        for key, value in s.other.items():
            off, why = _UNSUPPORTED[key]
            if value != off and not (off is None and value in ("", [], {})) and not (off == "" and value is None):
                p.append(f"{label}: {key} = {value!r}: {why}.")
        if not s.image_dir:
            p.append(f"{label}: image_dir is missing: set the folder that holds this subset's images.")
        if s.num_repeats is not None and s.num_repeats < 1:
            p.append(f"{label}: num_repeats = {s.num_repeats}: its images would never train; use 1 or more.")
    return p


def resolve(cfg) -> Tuple[Any, List[Subset], List[str]]:
    """(the config with the dataset's settings applied, the subsets to scan, warnings). Without subsets or a
    dataset_config: (cfg, [], []). The returned config holds the subsets inline and no dataset_config, so
    resolving it again changes nothing. Raises :class:`ConfigError` listing every problem."""
    if not cfg.dataset_config and not cfg.subsets:
        return cfg, [], []
    warnings: List[str] = []
    changes: Dict[str, Any] = {}
    problems: List[str] = []
    if cfg.dataset_config and cfg.subsets:
        raise ConfigError(["dataset_config and [[subsets]] are both set: keep one of them (the dataset config's "
                           "[[datasets.subsets]] or the training config's [[subsets]])."])
    base = Path(cfg.dataset_config).expanduser() if cfg.dataset_config else None
    if base is not None:
        subsets, level = read_dataset_config(base)
        where = f"{base.name} subsets"
        defaults = type(cfg)()
        for key, value in level.items():
            name = DATASET_KEYS[key]
            try:
                from ..config import _coerce
                value = _coerce(next(f for f in dataclasses.fields(cfg) if f.name == name), value)
            except (TypeError, ValueError) as e:
                problems.append(f"{base.name}: {key} = {value!r}: {e}")
                continue
            mine = getattr(cfg, name)
            if mine == value:
                continue
            if mine == getattr(defaults, name):
                changes[name] = value
            else:
                problems.append(f"{base.name} sets {key} = {value!r} but the training config has {name} = {mine!r}: "
                                f"remove one of them, or make them equal.")
    else:
        subsets = list(cfg.subsets)
        where = "subsets"
    problems += _subset_problems(subsets, where)
    # caption settings this trainer applies to the whole run: take them when every subset agrees
    for key in SHARED_CAPTION_KEYS:
        values = {getattr(s, key) if getattr(s, key) is not None else getattr(cfg, key) for s in subsets}
        if len(values) > 1:
            per = ", ".join(f"{Path(s.image_dir).name or '?'}: {getattr(s, key) if getattr(s, key) is not None else getattr(cfg, key)!r}"
                            for s in subsets)
            problems.append(f"the subsets differ in {key} ({per}): this trainer applies one {key} to the whole run; "
                            "give every subset the same value (or set it once in the training config).")
        elif values:
            v = values.pop()
            if v != getattr(cfg, key):
                changes[key] = v
    if problems:
        raise ConfigError(problems)
    if cfg.train_data_dir:
        source = f"dataset_config {cfg.dataset_config!r}" if base else "the config's [[subsets]]"
        warnings.append(f"train_data_dir {cfg.train_data_dir!r} is not used: the dataset is {source} (as in "
                        "sd-scripts); clear train_data_dir to silence this.")
    resolved, inline = [], []
    for s in subsets:
        d = Path(s.image_dir).expanduser()
        if not d.is_absolute() and base is not None and not d.exists() and (base.parent / d).exists():
            d = base.parent / d   # sd-scripts reads it from the working folder; the config's folder is tried too
        ext = s.caption_extension if s.caption_extension is not None else cfg.caption_extension
        resolved.append(Subset(d, s.num_repeats or 1, s.class_tokens or None, ext if ext.startswith(".") else "." + ext,
                               s.caption_prefix or "", s.caption_suffix or ""))
        inline.append(dataclasses.replace(s, image_dir=str(d), other={k: v for k, v in s.other.items()}))
    changes.update(subsets=inline, dataset_config="")
    return cfg.replace(**changes), resolved, warnings


def describe(cfg) -> str:
    """How the doctor names the dataset."""
    if cfg.dataset_config:
        return str(cfg.dataset_config)
    if cfg.subsets:
        return "subsets: " + ", ".join(s.image_dir for s in cfg.subsets)
    return cfg.train_data_dir
