"""The one training configuration: typed fields with sd-scripts' names, TOML in and out, validation.

An sd-scripts TOML (flat, or with one level of tables as kohya_ss writes) loads unchanged where
names match; keys we do not know are kept in ``unknown`` and reported, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import ConfigError, UserError
from .dataset.dataset_config import SubsetConfig  # noqa: E402  (the typed [[subsets]]; imports only errors)

CONFIG_VERSION = 1

from .io.toml_text import TOMLDecodeError, dumps_toml, loads_toml, parse_toml_value


def _f(default, help: str, section: str, **kw):
    """A config field with its help text (shown as the UI hint) and UI section."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "section": section, **kw})
    return field(default=default, metadata={"help": help, "section": section, **kw})


@dataclass
class TrainConfig:
    # --- dataset ---------------------------------------------------------------------------
    train_data_dir: str = _f("", "Folder holding concept folders named N_name (N = repeats).", "dataset")
    dataset_config: str = _f("", "sd-scripts' dataset config: a TOML with [general], [[datasets]] and [[datasets.subsets]] (image_dir, num_repeats, class_tokens ...). Its subsets are the dataset; train_data_dir is not used.", "dataset")
    subsets: List[SubsetConfig] = _f([], "LoRA_Easy's [[subsets]] in the training TOML (image_dir, num_repeats, class_tokens, keep_tokens ...): each is a concept; train_data_dir is not used.", "dataset")
    caption_extension: str = _f(".txt", "Caption file extension next to each image.", "captions")
    # --- model (standalone CLI only; the WebUI trains the loaded model) ----------------------
    pretrained_model_name_or_path: str = _f("", "Checkpoint file (.safetensors/.ckpt) for the CLI.", "model")
    model_config: str = _f("", "The checkpoint's yaml (LDM or SDXL's sgm), or a known architecture: sd1, sd2, sd2-v, sdxl. SDXL checkpoints are recognised by their keys.", "model")
    v2: bool = _f(False, "SD 2.x base model (CLI only; the WebUI detects it).", "model")
    v_parameterization: bool = _f(False, "v-prediction model (CLI only; the WebUI detects it).", "model")
    vae: str = _f("", "Optional external VAE file (CLI only).", "model")
    zero_terminal_snr: bool = _f(False, "Zero terminal SNR noise schedule (NoobAI-style v-prediction SDXL; CLI only: the WebUI uses its Noise schedule setting).", "model")
    # --- output --------------------------------------------------------------------------
    output_dir: str = _f("", "Where epoch files go (the WebUI uses models/Lora/<output_name>).", "saving")
    output_name: str = _f("lora", "File name stem: <name>-000001.safetensors ... and <name>.safetensors.", "saving")
    save_model_as: str = _f("safetensors", "Only safetensors is written.", "saving")
    save_precision: str = _f("fp16", "Precision of the saved file: float, fp16 or bf16.", "saving")
    save_every_n_epochs: int = _f(1, "Write an epoch file every N epochs (the last epoch is always written).", "saving")
    save_state: bool = _f(True, "Write the training state (<output_name>.trainstate beside the epochs) at each epoch end, on the timer and on Stop, so the run can be resumed.", "saving")
    save_state_every_n_minutes: float = _f(10.0, "Also write the training state this often during an epoch (0: only at epoch ends and on Stop).", "saving")
    resume: str = _f("", "Continue a run from its training state: 'auto' (this run's own <output_name>.trainstate) or a state file's path.", "saving")
    save_last_n_epochs: Optional[int] = _f(None, "Keep only the last N epoch files; empty keeps all.", "saving")
    training_comment: str = _f("", "Free text stored in the file's metadata.", "saving")
    # --- resolution & buckets ------------------------------------------------------------
    resolution: str = _f("512", "Training resolution: '512' or 'W,H'. The strongest quality lever; 768 needs 2x steps.", "resolution")
    enable_bucket: bool = _f(True, "Group images by aspect ratio instead of cropping them square.", "resolution")
    min_bucket_reso: int = _f(256, "Smallest bucket side.", "resolution")
    max_bucket_reso: int = _f(1024, "Largest bucket side.", "resolution")
    bucket_reso_steps: int = _f(64, "Bucket sides are multiples of this.", "resolution")
    bucket_no_upscale: bool = _f(False, "Never upscale a small image to a larger bucket.", "resolution")
    # --- captions ------------------------------------------------------------------------
    shuffle_caption: bool = _f(True, "Shuffle comma-separated tags each step.", "captions")
    keep_tokens: int = _f(1, "Keep the first N tags in place (the trigger word); 0 for styles.", "captions")
    caption_dropout_rate: float = _f(0.0, "Probability of training a step with an empty caption.", "captions")
    caption_tag_dropout_rate: float = _f(0.0, "Probability of dropping each (non-kept) tag.", "captions")
    max_token_length: int = _f(225, "75, 150 or 225 tokens (\"just use 225\").", "captions")
    clip_skip: int = _f(1, "2 for anime bases, 1 for realistic ones.", "captions")
    # --- network -------------------------------------------------------------------------
    network_module: str = _f("networks.lora", "networks.lora (LoRA/LoCon), lycoris.kohya (network_args algo=locon/loha/lokr/ia3/dylora/full/diag-oft/boft) or networks.dylora.", "network")
    network_dim: int = _f(32, "Rank. 32-64 is plenty; over 128 is waste.", "network")
    network_alpha: float = _f(16.0, "Scale = alpha/dim. Lower alpha needs a higher learning rate.", "network")
    network_args: List[str] = _f([], "key=value strings, e.g. conv_dim=8, conv_alpha=1 (LoCon).", "network")
    network_dropout: Optional[float] = _f(None, "Dropout on the LoRA's hidden units (0.1-0.3 pairs with scale_weight_norms).", "network")
    network_train_unet_only: bool = _f(False, "Train the UNet only.", "network")
    network_train_text_encoder_only: bool = _f(False, "Train the text encoder only.", "network")
    network_weights: str = _f("", "Start from an existing LoRA file (same dim and layers).", "network")
    scale_weight_norms: Optional[float] = _f(None, "Cap each module's weight norm (0.9-1.0); reports average key norm and keys scaled.", "network")
    # --- optimizer & schedule ------------------------------------------------------------
    learning_rate: float = _f(1e-4, "Base learning rate (1e-4 for AdamW at dim=alpha=64-128; 1.0 for adaptive optimizers).", "optimizer")
    unet_lr: Optional[float] = _f(None, "UNet learning rate (defaults to learning_rate).", "optimizer")
    text_encoder_lr: Optional[float] = _f(5e-5, "Text encoder learning rate: UNet's / 2-3.", "optimizer")
    optimizer_type: str = _f("AdamW", "AdamW, AdamW8bit, Lion, Prodigy, DAdaptAdam, ...", "optimizer")
    optimizer_args: List[str] = _f([], "key=value strings, e.g. weight_decay=0.01 betas=0.9,0.999.", "optimizer")
    lr_scheduler: str = _f("cosine", "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, adafactor, cosine_with_min_lr, inverse_sqrt, warmup_stable_decay, piecewise_constant.", "optimizer")
    lr_scheduler_type: str = _f("", "A scheduler class by dotted path (e.g. torch.optim.lr_scheduler.CosineAnnealingWarmRestarts), or CosineAnnealingWarmupRestarts (built in: T_0, gamma_min_lr, decay, down_factor, warmup_steps, cycle_warmup, init_lr_ground). Overrides lr_scheduler.", "optimizer")
    lr_scheduler_args: List[str] = _f([], "key=value strings for lr_scheduler_type (or a named schedule's extras), e.g. T_0=400 gamma_min_lr=0.999 down_factor=0.5.", "optimizer")
    lr_warmup_steps: float = _f(0.0, "Warm-up steps; a value below 1 is a fraction of all steps (0.05-0.1).", "optimizer")
    lr_scheduler_num_cycles: int = _f(1, "Cycles for cosine_with_restarts (4 cycles = 3 restarts).", "optimizer")
    lr_scheduler_power: float = _f(1.0, "Power for the polynomial schedule.", "optimizer")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm; 0 turns clipping off.", "optimizer")
    # --- loss & noise --------------------------------------------------------------------
    min_snr_gamma: Optional[float] = _f(5.0, "Min-SNR loss weighting gamma (5); empty turns it off.", "loss")
    noise_offset: Optional[float] = _f(None, "0.05-0.1 if used (not recommended).", "loss")
    multires_noise_iterations: Optional[int] = _f(None, "Multi-resolution (pyramid) noise iterations (6-10).", "loss")
    multires_noise_discount: float = _f(0.3, "Multi-resolution noise discount (0.1-0.3).", "loss")
    # --- steps ---------------------------------------------------------------------------
    train_batch_size: int = _f(2, "As large as memory allows; avoid large batches on tiny datasets.", "steps")
    gradient_accumulation_steps: int = _f(1, "Steps = images x repeats x epochs / (batch x accumulation).", "steps")
    max_train_epochs: Optional[int] = _f(10, "Train for this many epochs (or set max_train_steps).", "steps")
    max_train_steps: Optional[int] = _f(None, "Train for this many optimizer steps instead of epochs.", "steps")
    seed: int = _f(42, "Random seed: same seed and settings give the same run.", "steps")
    # --- precision & memory --------------------------------------------------------------
    mixed_precision: str = _f("bf16", "no, fp16 or bf16 (bf16 for RTX 30xx and newer, fp16 otherwise).", "precision")
    gradient_checkpointing: bool = _f(False, "Less memory, slower.", "precision")
    cache_latents: bool = _f(True, "Encode every image once before training (saves time and memory).", "precision")
    cache_latents_to_disk: bool = _f(False, "Keep the latent cache next to the images between runs.", "precision")
    cache_text_encoder_outputs: bool = _f(False, "Encode each caption once with the frozen text encoders and move them off the GPU (UNet-only training; SDXL saves several GB). With shuffled or dropped tags each variant is encoded once.", "precision")
    max_data_loader_n_workers: int = _f(0, "Accepted for compatibility; images are prepared in-process.", "precision")
    persistent_data_loader_workers: bool = _f(False, "Accepted for compatibility.", "precision")
    xformers: bool = _f(False, "Accepted for compatibility; the host's attention (SDPA) is used.", "precision")
    sdpa: bool = _f(True, "CLI (SD1/SD2): run ldm's attention through torch's scaled_dot_product_attention (fused, no stored score matrices); false keeps ldm's einsum. SDXL's diffusers UNet always uses SDPA; the WebUI keeps its own setting.", "precision")
    torch_compile: bool = _f(False, "CLI: compile the UNet's forward with torch.compile for the run (minutes to compile; measure the gain with `bench`).", "precision")
    dynamo_backend: str = _f("inductor", "torch.compile backend for torch_compile (inductor; eager to check the tracing only).", "precision")
    # --- samples & logs ------------------------------------------------------------------
    logging_dir: str = _f("", "TensorBoard log folder; empty turns logging off.", "logs")
    log_prefix: str = _f("", "Prefix of the run's log folder name.", "logs")
    sample_prompts: str = _f("", "A .txt file of prompts (one per line, --n --w --h --s --l --d options) or prompts separated by newlines.", "logs")
    sample_every_n_epochs: Optional[int] = _f(None, "Render sample images every N epochs.", "logs")
    sample_sampler: str = _f("ddim", "Sampler for samples (ddim).", "logs")

    # keys read from a file that this version does not know: reported, and written back out
    unknown: Dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    # ---------------------------------------------------------------- derived values
    def resolution_wh(self) -> Tuple[int, int]:
        return parse_resolution(self.resolution)

    def network_args_dict(self) -> Dict[str, Any]:
        return parse_kv_args(self.network_args, "network_args")

    def optimizer_args_dict(self) -> Dict[str, Any]:
        return parse_kv_args(self.optimizer_args, "optimizer_args")

    def lr_scheduler_args_dict(self) -> Dict[str, Any]:
        return parse_kv_args(self.lr_scheduler_args, "lr_scheduler_args")

    def effective_unet_lr(self) -> float:
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    def effective_text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- validation
    def problems(self, *, need_dataset: bool = True, need_output: bool = True) -> List[str]:
        """Every bad setting, each with the fix. Empty when the config can run."""
        p: List[str] = []
        if need_dataset and not self.train_data_dir and not self.dataset_config and not self.subsets:
            p.append("train_data_dir is empty: set it to the folder holding your N_name concept folders.")
        if need_output and not self.output_dir:
            p.append("output_dir is empty: set the folder the LoRA files are written to.")
        if not self.output_name or not re.fullmatch(r"[^/\\:*?\"<>|\x00-\x1f]+", self.output_name) \
                or ".." in self.output_name or self.output_name.strip() != self.output_name:
            p.append(f"output_name {self.output_name!r} is not a plain file name: use letters, digits, '-', '_' "
                     "(no path separators, no '..', no leading/trailing spaces).")
        try:
            w, h = self.resolution_wh()
            if w < 64 or h < 64 or w % 8 or h % 8:
                p.append(f"resolution {self.resolution!r}: both sides must be multiples of 8 and at least 64, e.g. 512 or 768,512.")
        except UserError as e:
            p.append(str(e))
        if self.network_dim < 1:
            p.append(f"network_dim = {self.network_dim}: the rank must be at least 1 (32-64 is typical).")
        if self.network_alpha < 0:
            p.append(f"network_alpha = {self.network_alpha}: must be >= 0 (0 means alpha = dim).")
        for name in ("learning_rate", "unet_lr", "text_encoder_lr"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                p.append(f"{name} = {v}: a learning rate must be a finite number >= 0, e.g. 1e-4.")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            p.append("network_train_unet_only and network_train_text_encoder_only are both set: choose one (or neither).")
        if self.train_unet() and self.effective_unet_lr() == 0 and (not self.train_text_encoder() or self.effective_text_encoder_lr() == 0):
            p.append("every learning rate is 0: nothing would train. Set learning_rate (e.g. 1e-4).")
        if not self.max_train_epochs and not self.max_train_steps:
            p.append("neither max_train_epochs nor max_train_steps is set: set one of them (e.g. max_train_epochs = 10).")
        for name in ("max_train_epochs", "max_train_steps", "save_last_n_epochs", "sample_every_n_epochs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                p.append(f"{name} = {v}: must be positive (or empty).")
        for name in ("train_batch_size", "gradient_accumulation_steps", "save_every_n_epochs", "bucket_reso_steps"):
            if getattr(self, name) < 1:
                p.append(f"{name} = {getattr(self, name)}: must be at least 1.")
        if self.max_token_length not in (75, 150, 225):
            p.append(f"max_token_length = {self.max_token_length}: use 75, 150 or 225.")
        if self.clip_skip < 1 or self.clip_skip > 12:
            p.append(f"clip_skip = {self.clip_skip}: use 1 (realistic bases) or 2 (anime bases).")
        if self.keep_tokens < 0:
            p.append(f"keep_tokens = {self.keep_tokens}: must be >= 0.")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "network_dropout"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < 1):
                p.append(f"{name} = {v}: a probability in [0, 1), e.g. 0.1.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            p.append(f"mixed_precision = {self.mixed_precision!r}: use no, fp16 or bf16.")
        if self.save_precision not in ("float", "fp32", "fp16", "bf16"):
            p.append(f"save_precision = {self.save_precision!r}: use float, fp16 or bf16.")
        if self.save_model_as != "safetensors":
            p.append(f"save_model_as = {self.save_model_as!r}: only safetensors is written.")
        if self.enable_bucket:
            if self.min_bucket_reso < self.bucket_reso_steps or self.min_bucket_reso > self.max_bucket_reso:
                p.append(f"min_bucket_reso = {self.min_bucket_reso}, max_bucket_reso = {self.max_bucket_reso}: "
                         f"need bucket_reso_steps ({self.bucket_reso_steps}) <= min <= max, e.g. 256 and 1024.")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            p.append(f"min_snr_gamma = {self.min_snr_gamma}: must be > 0 (5 is typical) or empty to turn it off.")
        if self.scale_weight_norms is not None and self.scale_weight_norms <= 0:
            p.append(f"scale_weight_norms = {self.scale_weight_norms}: must be > 0 (0.9-1.0) or empty.")
        if self.max_grad_norm < 0:
            p.append(f"max_grad_norm = {self.max_grad_norm}: must be >= 0 (0 turns clipping off).")
        if self.lr_warmup_steps < 0:
            p.append(f"lr_warmup_steps = {self.lr_warmup_steps}: must be >= 0.")
        elif self.lr_warmup_steps >= 1 and not float(self.lr_warmup_steps).is_integer():
            p.append(f"lr_warmup_steps = {self.lr_warmup_steps}: from 1 up it counts steps and must be whole "
                     f"(e.g. {int(self.lr_warmup_steps)}); below 1 it is a fraction of all steps (e.g. 0.05).")
        if self.lr_scheduler_num_cycles < 1:
            p.append(f"lr_scheduler_num_cycles = {self.lr_scheduler_num_cycles}: must be at least 1.")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            p.append(f"multires_noise_iterations = {self.multires_noise_iterations}: must be >= 0.")
        for args_name in ("network_args", "optimizer_args", "lr_scheduler_args"):
            try:
                parse_kv_args(getattr(self, args_name), args_name)
            except UserError as e:
                p.append(str(e))
        sched = self.lr_scheduler.split(":")[0]
        opt = self.optimizer_type.strip().lower()
        if sched == "adafactor" and opt != "adafactor" and not self.lr_scheduler_type:
            p.append(f"lr_scheduler = adafactor works only with optimizer_type = AdaFactor (not {self.optimizer_type}): "
                     "choose another lr_scheduler (e.g. cosine, constant) or optimizer_type AdaFactor.")
        if opt.endswith("schedulefree") and (self.lr_scheduler_type or sched not in ("constant", "constant_with_warmup")):
            p.append(f"optimizer_type = {self.optimizer_type} is schedule-free: set lr_scheduler = constant and no "
                     "lr_scheduler_type (lr_warmup_steps becomes the optimizer's own warm-up).")
        if self.cache_text_encoder_outputs and self.train_text_encoder():
            p.append("cache_text_encoder_outputs = true needs frozen text encoders: set network_train_unet_only = true "
                     "(or turn the cache off to train the text encoders).")
        try:
            na = self.network_args_dict()
            if "conv_dim" in na and int(na["conv_dim"]) < 1:
                p.append(f"network_args conv_dim = {na['conv_dim']}: must be at least 1 (dim/2-4 is typical).")
        except (UserError, ValueError, TypeError):
            pass
        return p

    def validate(self, **kw) -> "TrainConfig":
        problems = self.problems(**kw)
        if problems:
            raise ConfigError(problems)
        return self

    # ---------------------------------------------------------------- TOML
    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"config_version": CONFIG_VERSION}
        for f in fields(self):
            if f.metadata.get("internal"):
                continue
            d[f.name] = getattr(self, f.name)
        d["subsets"] = [s.to_dict() for s in self.subsets]
        d.update(self.unknown)
        return d

    def to_toml(self) -> str:
        """TOML that sd-scripts reads as this trainer does (its TOML values go into its argparse namespace
        unconverted): unset options (None; "" where "" is the default) are left out, so sd-scripts sees
        its own default (None). One whose default here is set (text_encoder_lr, min_snr_gamma,
        max_train_epochs) is named in ``unset_options``, a key sd-scripts never reads, so it reads back
        unset. ``lr_warmup_steps`` of 0 or from 1 up is a whole number: sd-scripts takes a float as a
        fraction of all steps. Older files wrote "" for unset options; they still read back as None."""
        d: Dict[str, Any] = {"config_version": CONFIG_VERSION}
        unset: List[str] = []
        for f in fields(self):
            if f.metadata.get("internal"):
                continue
            v = getattr(self, f.name)
            if f.name == "subsets":   # LoRA_Easy's key (sd-scripts never reads it): inline tables, left out when empty
                if v:
                    d[f.name] = [s.to_dict() for s in v]
                continue
            if _is_unset(f, v):
                if not _is_unset(f, _default_of(f)):
                    unset.append(f.name)
                continue
            d[f.name] = v
        w = d.get("lr_warmup_steps")
        if isinstance(w, float) and (w == 0 or w >= 1) and w.is_integer():
            d["lr_warmup_steps"] = int(w)
        if unset:
            d[UNSET_KEY] = unset
        d.update(self.unknown)
        return dumps_toml(d)

    def save(self, path: Union[str, Path]) -> None:
        from .io.atomic import atomic_write_bytes
        atomic_write_bytes(Path(path), self.to_toml().encode("utf-8"))

    @classmethod
    def from_dict(cls, data: Dict[str, Any], *, strict_types: bool = True) -> "TrainConfig":
        flat = _flatten(data)
        flat.pop("config_version", None)
        known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
        values: Dict[str, Any] = {}
        unknown: Dict[str, Any] = {}
        problems: List[str] = []
        for key in _unset_names(flat.pop(UNSET_KEY, None), problems):
            f = known.get(ALIASES.get(key, key))
            if f is None or not _is_unset(f, None if "Optional" in str(f.type) else ""):
                problems.append(f"{UNSET_KEY} names {key!r}, which is not a setting that can be unset: remove it "
                                "(only optional settings and paths can be).")
            else:  # a value given in the file as well wins (set below)
                values[f.name] = None if "Optional" in str(f.type) else ""
        for key, value in flat.items():
            if key in ALIASES:
                key = ALIASES[key]
            if key not in known:
                unknown[key] = value
                continue
            try:
                if key == "subsets":
                    from .dataset.dataset_config import parse_subsets
                    values[key] = parse_subsets(value)
                    continue
                values[key] = _coerce(known[key], value)
            except (TypeError, ValueError) as e:
                problems.append(str(e) if key == "subsets" else f"{key} = {value!r}: {e}")
        if problems:
            raise ConfigError(problems)
        cfg = cls(**values)
        cfg.unknown = unknown
        return cfg

    @classmethod
    def from_toml(cls, text: str) -> "TrainConfig":
        try:
            data = loads_toml(text)
        except TOMLDecodeError as e:
            raise UserError(f"The config is not valid TOML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"Config file {str(p)!r} does not exist.")
        return cls.from_toml(p.read_text(encoding="utf-8"))

    def with_overrides(self, assignments: List[str]) -> "TrainConfig":
        """Apply ``key=value`` strings; each value is read as a TOML value, a bare word is a string."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise UserError(f"--set {a!r}: write key=value, e.g. --set network_dim=16.")
            k, v = a.split("=", 1)
            d[k.strip()] = parse_toml_value(v.strip())
        return type(self).from_dict(d)


# sd-scripts / kohya_ss spellings that mean one of our fields
ALIASES = {"train_data_dir_path": "train_data_dir", "epoch": "max_train_epochs"}

# the key listing the options a saved config leaves unset although their default is set (sd-scripts never reads it)
UNSET_KEY = "unset_options"

# sd-scripts declares these nargs="*" (one value per text encoder) and train_network.py reads a bare number too
_SD_SCRIPTS_LISTS = {"text_encoder_lr"}


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _is_unset(f: dataclasses.Field, value: Any) -> bool:
    """None, or "" in a text setting whose default is "" (a path or name left empty)."""
    return value is None or (value == "" and isinstance(value, str) and f.default == "")


def _unset_names(value: Any, problems: List[str]) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
        problems.append(f"{UNSET_KEY} = {value!r}: write a list of setting names, e.g. [\"min_snr_gamma\"].")
        return []
    return list(value)


def field_help() -> Dict[str, Dict[str, str]]:
    """name -> {help, section}: the hints the UI shows."""
    return {f.name: {"help": f.metadata["help"], "section": f.metadata["section"]}
            for f in fields(TrainConfig) if not f.metadata.get("internal")}


def _flatten(data: Dict[str, Any]) -> Dict[str, Any]:
    """kohya_ss writes configs with one level of tables; sd-scripts reads them flattened."""
    out: Dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in ("unknown",):
            for k2, v2 in v.items():
                out[k2] = v2
        else:
            out[k] = v
    return out


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    t = f.type if not isinstance(f.type, str) else f.type
    optional = "Optional" in str(t)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ValueError("a value is required")
    base = str(t)
    if f.name in _SD_SCRIPTS_LISTS and isinstance(value, (list, tuple)):
        if not value:
            return None
        if any(x != value[0] for x in value):
            raise ValueError(f"one learning rate for every text encoder here (sd-scripts' networks.lora uses the "
                             f"first too): write one number, e.g. {value[0]!r}")
        value = value[0]
    if "List" in base:
        if isinstance(value, str):
            return [s for s in value.split() if s] if "=" in value else ([value] if value else [])
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list of strings like [\"key=value\"]")
        return [str(x) for x in value]
    if "bool" in base:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError("expected true or false")
    if "int" in base:
        if isinstance(value, bool):
            raise TypeError("expected a whole number")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        if not isinstance(value, int):
            raise TypeError("expected a whole number")
        return value
    if "float" in base:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        return float(value)
    if "str" in base:
        if f.name == "resolution" and isinstance(value, (int, float)):
            return str(int(value))
        if f.name == "resolution" and isinstance(value, (list, tuple)):
            return ",".join(str(int(x)) for x in value)
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    return value


def parse_resolution(value: Union[str, int]) -> Tuple[int, int]:
    s = str(value).replace("x", ",").replace(" ", "")
    try:
        parts = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise UserError(f"resolution {value!r}: write one size (512) or width,height (768,512).") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise UserError(f"resolution {value!r}: write one size (512) or width,height (768,512).")


def parse_value(text: str) -> Any:
    """A typed value from an args string: ints, floats, booleans, None, tuples (``0.9,0.999``), strings."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in t:
        return tuple(parse_value(x) for x in t.split(",") if x.strip())
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        return t[1:-1]
    return t


def parse_kv_args(items: List[str], what: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what}: {item!r} is not key=value; write e.g. \"weight_decay=0.01\".")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k.isidentifier():
            raise UserError(f"{what}: {k!r} is not a valid argument name.")
        out[k] = parse_value(v)
    return out


