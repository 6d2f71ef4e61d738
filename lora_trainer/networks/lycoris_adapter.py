"""LyCORIS the sd-scripts way (``network_module = "lycoris.kohya"``, ``network_args = ["algo=lokr", ...]``)
over the host's LDM UNet and text encoders, through lycoris-lora's module classes.

Why not ``lycoris.kohya.create_network``: its presets list diffusers class names (on the WebUI's
LDM UNet they match nothing), it keeps its settings in class attributes (process-global), and its
names are not kohya's SD1 names. Here the presets are mapped to the LDM classes, every layer gets
the same kohya name as our plain LoRA (so every key resolves in the WebUI), and lycoris-lora only
supplies the per-layer math. Known library faults (research libs.md §3.5) are avoided:

- LoHa's merge scales ΔW twice: nothing here uses LyCORIS's merge; ΔW comes from the saved
  tensors by the WebUI's own rule (:mod:`lycoris_delta`).
- IA3/DyLoRA do not reload through ``create_lycoris_from_weights``: files are reloaded into a network
  built from the same settings, by plain state-dict loading.
- GLoRA is saved in a layout the WebUI cannot load, and ``tlora`` is unknown to it: refused.
- DoRA: the WebUI applies the column-norm form only, so ``wd_on_output`` is False (True is refused).
- ``algo=full``: LyCORIS' module deletes and recreates the layer's weight (on the CPU); our own
  non-invasive diff module (:mod:`full_diff`) is used instead, saving the same ``diff``/``diff_b``.
- OpenCLIP attention (SD2, SDXL's second encoder) cannot be adapted by LyCORIS: refused for the
  text encoder, with the fix.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import UserError
from .base import NetworkBase
from .naming import HF_CLIP_TARGETS, hf_clip_te_name, unet_kohya_name

log = logging.getLogger(__name__)

NETWORK_MODULE = "lycoris.kohya"
ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "diag-oft", "boft")
REFUSED_ALGOS = {
    "glora": "the WebUI (v1.10) cannot load GLoRA files as lycoris-lora saves them (a shape error for every "
             "layer)",
    "tlora": "the WebUI does not know this algorithm",
}
TRANSFORMER = {"SpatialTransformer", "SpatialTransformer3D"}
CONV_BLOCKS = {"ResBlock", "Downsample", "Upsample"}
# sgm/ldm attention classes, and diffusers' "Attention" (the CLI's SDXL UNet, seen under sgm's names)
ATTENTION = {"CrossAttention", "MemoryEfficientCrossAttention", "CrossAttentionPatched", "Attention"}
CLIP_ATTENTION = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}
EDGE_NAMES = ["time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2"]
CONV_EDGE_NAMES = ["input_blocks.0.0", "out.2"]

# LyCORIS' presets, in the WebUI's LDM class names
PRESETS: Dict[str, Dict[str, Any]] = {
    "full": dict(conv=True, unet_classes=TRANSFORMER | CONV_BLOCKS, unet_names=EDGE_NAMES + CONV_EDGE_NAMES,
                 te_classes=HF_CLIP_TARGETS),
    "full-lin": dict(conv=False, unet_classes=TRANSFORMER | {"ResBlock"}, unet_names=EDGE_NAMES,
                     te_classes=HF_CLIP_TARGETS),
    "attn-mlp": dict(conv=False, unet_classes=TRANSFORMER, unet_names=[], te_classes=HF_CLIP_TARGETS),
    "attn-only": dict(conv=False, unet_classes=ATTENTION, unet_names=[], te_classes=CLIP_ATTENTION),
    "unet-only": dict(conv=True, unet_classes=TRANSFORMER | CONV_BLOCKS, unet_names=EDGE_NAMES + CONV_EDGE_NAMES,
                      te_classes=set()),
    "unet-transformer-only": dict(conv=False, unet_classes=TRANSFORMER, unet_names=[], te_classes=set()),
    "unet-convblock-only": dict(conv=True, unet_classes=CONV_BLOCKS, unet_names=CONV_EDGE_NAMES, te_classes=set()),
    "ia3": dict(conv=False, unet_classes=set(), unet_suffixes=["attn1.to_k", "attn1.to_v", "attn2.to_k",
                                                                  "attn2.to_v", "ff.net.2"],
                te_classes=set(), te_suffixes=["self_attn.k_proj", "self_attn.v_proj", "mlp.fc2"],
                on_input=("ff.net.2", "mlp.fc2")),
}

# network_args this adapter understands (sd-scripts + lycoris.kohya names)
COMMON_ARGS = {"algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "train_norm",
               "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "rank_dropout_scale",
               "bypass_mode"}
ALGO_ARGS = {
    "lora": {"dora_wd", "wd_on_output", "rs_lora"},
    "locon": {"dora_wd", "wd_on_output", "rs_lora"},
    "loha": {"dora_wd", "wd_on_output", "rs_lora"},
    "lokr": {"factor", "decompose_both", "full_matrix", "unbalanced_factorization", "dora_wd", "wd_on_output",
             "rs_lora"},
    "ia3": {"train_on_input"},
    "dylora": {"block_size"},
    "full": set(),
    "diag-oft": {"constraint", "rescaled"},
    "boft": {"constraint", "rescaled"},
}


def _lycoris():
    try:
        import lycoris  # noqa: F401
        from lycoris.modules.norms import NormModule
        from lycoris.wrapper import network_module_dict
    except ImportError as e:
        raise UserError("network_module lycoris.kohya needs the package 'lycoris-lora', which is not installed "
                        f"({e}). Install it into the Python that runs the trainer: pip install lycoris-lora==4.0.0 "
                        "with torch < 2.4 (newer versions fail to import there), lycoris-lora>=4.1 with torch "
                        ">= 2.4.") from None
    except AttributeError as e:
        raise UserError(f"lycoris-lora fails to import on this torch ({e}): versions 4.1 and newer need torch >= "
                        "2.4. Install lycoris-lora==4.0.0.") from None
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # its own stdout handler prints every module
    return network_module_dict, NormModule


# ------------------------------------------------------------------ settings
def settings(network_args: Dict[str, Any], dim: int, alpha: float) -> Dict[str, Any]:
    """Check and normalise ``network_args``; raises UserError naming the bad value and the fix."""
    na = dict(network_args)
    algo = str(na.get("algo", "lora")).lower()
    if algo in REFUSED_ALGOS:
        raise UserError(f"network_args algo={algo}: {REFUSED_ALGOS[algo]}. Use one of: {', '.join(ALGOS)}.")
    if algo not in ALGOS:
        raise UserError(f"network_args algo={algo} is unknown. Use one of: {', '.join(ALGOS)}.")
    unknown = sorted(set(na) - COMMON_ARGS - ALGO_ARGS[algo])
    if unknown:
        raise UserError(f"network_args {unknown} are not understood by lycoris.kohya algo={algo}; it takes "
                        f"{sorted(COMMON_ARGS | ALGO_ARGS[algo])}.")
    preset = str(na.get("preset", "full"))
    if preset not in PRESETS:
        raise UserError(f"network_args preset={preset} is unknown. Use one of: {', '.join(PRESETS)}.")
    if algo == "ia3" and preset != "ia3":
        log.warning("LyCORIS recommends preset=ia3 for algo=ia3")
    s: Dict[str, Any] = {"algo": algo, "preset": preset, "dim": int(dim), "alpha": float(alpha or dim)}
    s["conv_dim"] = int(na.get("conv_dim") or dim)
    s["conv_alpha"] = float(na.get("conv_alpha") or s["alpha"])
    for k in ("dropout", "rank_dropout", "module_dropout"):
        v = float(na.get(k) or 0.0)
        if not 0 <= v < 1:
            raise UserError(f"network_args {k}={v}: a probability in [0, 1), e.g. 0.1.")
        s[k] = v
    s["train_norm"] = _bool(na, "train_norm")
    s["use_tucker"] = any(_bool(na, k) for k in ("use_tucker", "use_cp", "use_conv_cp")) or \
        ("disable_conv_cp" in na and not _bool(na, "disable_conv_cp"))
    extra: Dict[str, Any] = {}
    for k in ("use_scalar", "rank_dropout_scale", "bypass_mode", "decompose_both", "full_matrix",
              "unbalanced_factorization", "rescaled", "rs_lora", "train_on_input"):
        if k in na:
            extra[k] = _bool(na, k)
    if "factor" in na:
        extra["factor"] = int(na["factor"])
        if extra["factor"] == 0 or extra["factor"] < -1:
            raise UserError(f"network_args factor={na['factor']}: use -1 (automatic) or a positive number like 4 or 8.")
    if "block_size" in na:
        extra["block_size"] = int(na["block_size"])
    if "constraint" in na:
        extra["constraint"] = float(na["constraint"])
    if _bool(na, "dora_wd"):
        if "wd_on_output" in na and _bool(na, "wd_on_output"):
            raise UserError("network_args dora_wd=True with wd_on_output=True: the WebUI applies DoRA's scale per "
                            "input column only, so such a file would load wrong there. Remove wd_on_output.")
        extra["weight_decompose"] = True
        extra["wd_on_out"] = False
    s["extra"] = extra
    return s


def _bool(na: Dict[str, Any], k: str) -> bool:
    v = na.get(k, False)
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def config_problems(network_args: Dict[str, Any], dim: int, alpha: float, *, train_te: bool,
                    text_encoders=()) -> List[str]:
    try:
        _lycoris()
        settings(network_args, dim, alpha)
    except UserError as e:
        return [str(e)]
    if train_te and any(isinstance(m, nn.MultiheadAttention) for _, te in text_encoders for m in te.modules()):
        return [OPENCLIP_MSG]
    return []


OPENCLIP_MSG = ("lycoris.kohya cannot train this model's OpenCLIP text encoder (SD2, SDXL's second encoder): its "
                 "fused attention has no layers LyCORIS can adapt. Set network_train_unet_only = true, or use "
                 "network_module = networks.lora for the text encoder.")


# ------------------------------------------------------------------ targets
def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv1x1" if tuple(m.kernel_size) == (1, 1) else "conv"
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    return None


def _walk(root: nn.Module, classes, names, suffixes=()) -> List[Tuple[str, nn.Module]]:
    out: Dict[str, nn.Module] = {}
    for parent_name, parent in root.named_modules():
        if type(parent).__name__ in classes:
            for child_name, child in parent.named_modules():
                if child_name and _kind(child):
                    out.setdefault(f"{parent_name}.{child_name}" if parent_name else child_name, child)
        elif parent_name in names and _kind(parent):
            out.setdefault(parent_name, parent)
        elif suffixes and any(parent_name.endswith(s) for s in suffixes) and _kind(parent):
            out.setdefault(parent_name, parent)
    return list(out.items())


def targets(unet: Optional[nn.Module], text_encoders, preset: str) -> List[Tuple[str, nn.Module, bool, str]]:
    """(kohya name, layer, is_text_encoder, path) for every layer the preset covers."""
    p = PRESETS[preset]
    out = []
    if unet is not None:
        style = "ldm" if any(n.startswith("label_emb") for n, _ in unet.named_children()) else "diffusers"
        for path, m in _walk(unet, p["unet_classes"], p.get("unet_names", []), p.get("unet_suffixes", ())):
            out.append((unet_kohya_name(path, style), m, False, path))
    for prefix, te in text_encoders:
        if any(isinstance(m, nn.MultiheadAttention) for m in te.modules()):
            raise UserError(OPENCLIP_MSG)
        for path, m in _walk(te, p["te_classes"], [], p.get("te_suffixes", ())):
            out.append((hf_clip_te_name(prefix, path), m, True, path))
    return out


# ------------------------------------------------------------------ the network
class AdapterNetwork(NetworkBase):
    """One adapter module per adapted layer (lycoris-lora's, or ours with the same interface: apply_to,
    restore, multiplier, org_module), registered under its kohya name so ``state_dict()`` has the
    file's keys. Offers what the training run uses of :class:`LoRANetwork`."""

    def __init__(self, s: Dict[str, Any]):
        super().__init__()
        self.settings = s
        self._saved_forwards: Dict[str, Any] = {}

    def add(self, name: str, module: nn.Module, is_text_encoder: bool) -> None:
        if name in self._modules:
            raise RuntimeError(f"two layers map to the name {name}")
        self.add_module(name, module)
        (self.te_names if is_text_encoder else self.unet_names).append(name)

    @classmethod
    def create(cls, unet: Optional[nn.Module], text_encoders, *, dim: int, alpha: float,
               network_args: Dict[str, Any], dropout: Optional[float] = None) -> "AdapterNetwork":
        module_dict, NormModule = _lycoris()
        na = dict(network_args)
        if dropout and "dropout" not in na:
            na["dropout"] = dropout
        s = settings(na, dim, alpha)
        net = cls(s)
        preset = PRESETS[s["preset"]]
        on_input = preset.get("on_input", ())
        for name, layer, is_te, path in targets(unet, list(text_encoders), s["preset"]):
            kind = _kind(layer)
            extra = dict(s["extra"])
            if kind == "norm":
                if not s["train_norm"]:
                    continue
                m = NormModule(name, layer, 1.0, s["rank_dropout"], s["module_dropout"])
            else:
                if kind == "conv" and not preset["conv"]:
                    continue
                if s["algo"] == "ia3" and kind != "linear":
                    continue  # the WebUI's IA3 rule is written for Linear layers (a shape error on convs)
                d, a = (s["conv_dim"], s["conv_alpha"]) if kind == "conv" else (s["dim"], s["alpha"])
                if s["algo"] == "ia3" and any(path.endswith(x) for x in on_input):
                    extra.setdefault("train_on_input", True)
                if s["algo"] == "full":
                    from .full_diff import FullDiffModule
                    m = FullDiffModule(name, layer, dropout=s["dropout"], module_dropout=s["module_dropout"])
                elif s["algo"] == "dylora":
                    from .dylora import DyLoRAModule
                    unit = int(extra.get("block_size", 4))
                    if d % unit:
                        raise UserError(f"network_args block_size={unit}: DyLoRA needs network_dim/conv_dim "
                                        f"({d}) to be a multiple of it.")
                    m = DyLoRAModule(name, layer, d, a, unit=unit, dropout=s["dropout"],
                                     module_dropout=s["module_dropout"])
                else:
                    try:
                        m = module_dict[s["algo"]](name, layer, 1.0, d, a, s["dropout"], s["rank_dropout"],
                                                   s["module_dropout"], s["use_tucker"], **extra)
                    except (ValueError, NotImplementedError) as e:
                        log.debug("LyCORIS %s skips %s: %s", s["algo"], name, e)
                        continue
            if getattr(m, "not_supported", False):
                continue
            net.add(name, m, is_te)
        if not net._modules:
            raise UserError(f"No layer of the model matched LyCORIS preset {s['preset']} for the parts being trained: "
                            "choose another preset (full covers everything).")
        return net

    # ------------------------------------------------------------ apply / remove
    def apply(self) -> None:
        if self.applied:
            return
        for name, m in self._modules.items():
            layer = m.org_module[0]
            self._saved_forwards[name] = layer.__dict__.get("forward")
            m.apply_to()
        self.applied = True

    def remove(self) -> None:
        if not self.applied:
            return
        for name, m in reversed(list(self._modules.items())):
            m.restore()
            layer = m.org_module[0]
            had = self._saved_forwards.pop(name, None)
            if had is None:
                layer.__dict__.pop("forward", None)   # leave no instance attribute behind
            else:
                layer.forward = had
        self.applied = False

    # ------------------------------------------------------------ weights
    def kohya_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_kohya_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        self._load_checked(sd, f"this LyCORIS network ({self.settings['algo']}, preset {self.settings['preset']})",
                           "algo, preset, network_dim, conv_dim, factor")

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LyCORIS' per-module max-norm (LoRA/LoCon, LoHa, LoKr; other algorithms have none)."""
        scaled, norms = [], []
        device = None
        for m in self.lora_modules():
            fn = getattr(m, "apply_max_norm", None)
            if fn is None:
                continue
            sc, norm = fn(max_norm, None)
            if sc is None:
                continue
            norm = torch.as_tensor(norm).float().reshape(())
            device = norm.device
            norms.append(norm)
            scaled.append(torch.as_tensor(sc, dtype=torch.float32, device=device).reshape(()))
        if not norms:
            z = torch.zeros(())
            return z, z, z
        n = torch.stack([x.to(device) for x in norms])
        return torch.stack(scaled).sum(), n.mean(), n.max()


LycorisNetwork = AdapterNetwork


def create_from_config(cfg, host) -> AdapterNetwork:
    return LycorisNetwork.create(host.unet if cfg.train_unet() else None,
                                 _hf_text_encoders(host) if cfg.train_text_encoder() else [],
                                 dim=cfg.network_dim, alpha=cfg.network_alpha, network_args=cfg.network_args_dict(),
                                 dropout=cfg.network_dropout)


def _hf_text_encoders(host):
    return list(host.text_encoders)
