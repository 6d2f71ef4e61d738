"""Extract: a LoRA from a fine-tuned checkpoint against its base, as sd-scripts'
``networks/extract_lora_from_models.py``.

For every layer a LoRA targets (UNet transformer blocks; with ``conv_dim`` also ResBlocks and
down/up-samplers; the text encoders' attention and MLP) the difference ``tuned - base`` is cut to its
best rank-``dim`` approximation by SVD (``conv_dim`` for 3×3 convs), singular values in ``lora_up``,
values clamped at the ``clamp_quantile`` quantile (0.99; 1 turns clamping off), alpha = rank (scale
1). The text encoders are left out when their largest difference is at most ``min_diff`` (the usual
case: most fine-tunes leave them alone). Layers that did not change at all are left out.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..errors import UserError
from ..io.lora_file import SAVE_DTYPES, save_lora
from .checkpoint_keys import Checkpoint, Target, lora_targets
from .files import KIND_NAMES, check_output, kind_metadata, output_metadata
from .lora_math import SVD, retained, to_lora

log = logging.getLogger(__name__)


@dataclass
class ModuleExtract:
    name: str
    rank: int
    fro: float        # share of the difference's Frobenius norm the rank keeps (before clamping)
    max_diff: float


@dataclass
class ExtractReport:
    model_org: Path
    model_tuned: Path
    output: Path
    kind: str
    dim: int
    conv_dim: Optional[int]
    modules: List[ModuleExtract] = field(default_factory=list)
    text_encoder_max_diff: float = 0.0
    text_encoder_used: bool = False
    unchanged: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self, per_module: bool = True) -> List[str]:
        out = [f"extract {self.model_tuned.name} - {self.model_org.name} ({KIND_NAMES[self.kind]}) -> {self.output} "
               f"(dim {self.dim}{f', conv_dim {self.conv_dim}' if self.conv_dim else ''})"]
        if per_module:
            width = max((len(m.name) for m in self.modules), default=10)
            out.append(f"  {'module':<{width}}  rank  Frobenius kept  max|diff|")
            for m in self.modules:
                out.append(f"  {m.name:<{width}}  {m.rank:>4}  {100 * m.fro:13.2f}%  {m.max_diff:9.3g}")
        te = ("included" if self.text_encoder_used else "left out (the same in both models)")
        out.append(f"summary: text encoder {te}: largest difference {self.text_encoder_max_diff:.3g}")
        if self.modules:
            worst = min(self.modules, key=lambda m: m.fro)
            out.append(f"summary: {len(self.modules)} modules; Frobenius norm of the difference kept: mean "
                       f"{100 * sum(m.fro for m in self.modules) / len(self.modules):.1f}%, min {100 * worst.fro:.1f}% "
                       f"({worst.name}); {self.seconds:.1f}s")
        if self.unchanged:
            out.append(f"summary: {len(self.unchanged)} layers are identical in both models and were left out")
        return out


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    if x.numel() <= (1 << 24) - 1:
        return torch.quantile(x, q)
    k = max(1, min(x.numel(), int(round(q * (x.numel() - 1))) + 1))
    return x.kthvalue(k).values


def _weight(ck: Checkpoint, t: Target) -> torch.Tensor:
    w = ck.get(t.key)
    return w[t.rows[0]:t.rows[1]] if t.rows else w


def extract_lora(model_org, model_tuned, save_to, *, dim: int = 4, conv_dim: Optional[int] = None,
                 clamp_quantile: float = 0.99, min_diff: float = 0.01, save_precision: str = "float",
                 device: str = "cpu", overwrite: bool = False,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> ExtractReport:
    t0 = time.time()
    if int(dim) < 1 or (conv_dim is not None and int(conv_dim) < 1):
        raise UserError(f"dim {dim} / conv_dim {conv_dim} must be at least 1.")
    if not 0 < clamp_quantile <= 1:
        raise UserError(f"clamp_quantile {clamp_quantile} must be in (0, 1] (1 = no clamping).")
    if save_precision not in SAVE_DTYPES:
        raise UserError(f"save_precision {save_precision!r} is unknown: use float, fp16 or bf16.")
    out = check_output(save_to, [model_org, model_tuned], overwrite=overwrite)
    org, tuned = Checkpoint(model_org), Checkpoint(model_tuned)
    if org.path.resolve() == tuned.path.resolve():
        raise UserError("model_org and model_tuned are the same file: give the base and the fine-tuned checkpoint.")
    if org.kind != tuned.kind:
        raise UserError(f"{tuned.name} is an {KIND_NAMES[tuned.kind]} checkpoint but {org.name} is "
                        f"{KIND_NAMES[org.kind]}: extract needs a fine-tune and its own base.")
    targets = lora_targets(org.shapes, org.kind, conv=conv_dim is not None)
    for t in targets:
        if tuned.shapes.get(t.key) != org.shapes[t.key]:
            raise UserError(f"{tuned.name} does not fit {org.name}: {t.key} is "
                            f"{tuned.shapes.get(t.key, 'missing')} vs {org.shapes[t.key]}. Is it a fine-tune of it?")
    report = ExtractReport(org.path, tuned.path, out, org.kind, int(dim), conv_dim)
    te_targets = [t for t in targets if t.is_text_encoder]
    with torch.no_grad():
        for t in te_targets:
            d = (_weight(tuned, t).float() - _weight(org, t).float()).abs().max()
            report.text_encoder_max_diff = max(report.text_encoder_max_diff, float(d))
    report.text_encoder_used = report.text_encoder_max_diff > min_diff
    if not report.text_encoder_used:
        targets = [t for t in targets if not t.is_text_encoder]
    tensors: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, t in enumerate(targets):
            diff = (_weight(tuned, t).float() - _weight(org, t).float()).to(device)
            max_diff = float(diff.abs().max())
            if max_diff == 0:
                report.unchanged.append(t.name)
                continue
            mat = diff.reshape(diff.shape[0], -1)
            rank = min(int(conv_dim if t.is_conv3x3 else dim), *mat.shape)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            svd = SVD(u, s, vh, tuple(diff.shape))
            up, down = to_lora(svd, rank)
            if clamp_quantile < 1:
                hi = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
                up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
            tensors[f"{t.name}.lora_up.weight"] = up
            tensors[f"{t.name}.lora_down.weight"] = down
            tensors[f"{t.name}.alpha"] = torch.tensor(float(rank))
            report.modules.append(ModuleExtract(t.name, rank, retained(s, rank).fro, max_diff))
            if progress:
                progress(i + 1, len(targets), t.name)
    if not tensors:
        raise UserError(f"{tuned.name} and {org.name} do not differ in any layer a LoRA can hold: nothing to extract.")
    pred = (tuned.metadata or {}).get("modelspec.prediction_type", "")
    md = kind_metadata(org.kind, v_pred=pred == "v")
    md.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
               "ss_sd_model_name": org.name})
    if conv_dim is not None:
        md["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))})
    comment = (f"extracted from {tuned.name} against {org.name}: dim {dim}"
               + (f", conv_dim {conv_dim}" if conv_dim else "") + f", clamp_quantile {clamp_quantile}")
    note = {"tool": "extract", "model_org": org.name, "model_tuned": tuned.name, "dim": dim, "conv_dim": conv_dim,
            "clamp_quantile": clamp_quantile, "min_diff": min_diff,
            "text_encoder": report.text_encoder_used, "save_precision": save_precision}
    save_lora(out, tensors, output_metadata(md, out, note, comment), save_precision)
    report.seconds = time.time() - t0
    log.info("extracted %s - %s -> %s", tuned.path, org.path, out)
    return report
