"""The epochs x weights comparison the guide sets up by hand in the X/Y/Z plot script, as data.

X = the run's epoch files (Prompt S/R over the first epoch's name), Y = LoRA weights (Prompt S/R over
``:<first weight>>``) or, in the seeds variant, Y = Seed ``-1--1 [8]``. The result is an infotext the
WebUI's paste mechanism loads into txt2img (selecting "X/Y/Z plot" and filling its axes), and the
positional ``script_args`` the HTTP API takes. Prompt S/R is used because it exists in every WebUI
version and needs no axis of ours; its first value must appear in the prompt, which the preset
guarantees.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import UserError

# txt2img axis labels -> index in WebUI v1.10.1 (read them from /sdapi/v1/script-info when you can)
V1_10_AXES = {"Nothing": 0, "Seed": 1, "Prompt S/R": 7}
EPOCH_RE = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})$")


@dataclass
class XYZPreset:
    prompt: str
    negative_prompt: str
    x_type: str
    x_values: str
    y_type: str
    y_values: str
    infotext: str
    stems: List[str]
    weights: List[float] = field(default_factory=list)
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 1234
    width: int = 512
    height: int = 512
    sampler: str = "Euler a"
    clip_skip: int = 1

    def script_args(self, axis_index: Optional[Dict[str, int]] = None) -> list:
        """The 18 positional args of X/Y/Z plot in WebUI v1.10.1 (types are indices)."""
        idx = axis_index or V1_10_AXES
        return [idx[self.x_type], self.x_values, [], idx[self.y_type], self.y_values, [], idx["Nothing"], "", [],
                True, False, False, False, False, False, False, 0, False]

    def txt2img_request(self, axis_index: Optional[Dict[str, int]] = None) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
                "cfg_scale": self.cfg_scale, "seed": self.seed, "width": self.width, "height": self.height,
                "sampler_name": self.sampler, "script_name": "X/Y/Z plot",
                "script_args": self.script_args(axis_index),
                "override_settings": {"CLIP_stop_at_last_layers": self.clip_skip}}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["script_args"] = self.script_args()
        return d


def parse_weights(spec: str) -> List[float]:
    """``0.7-1.5 [5]`` (count), ``0-1 (+0.25)`` (step) or a list ``0.5, 0.8, 1``: the X/Y/Z syntax."""
    s = spec.strip()
    m = re.fullmatch(r"(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\[(\d+)\]", s)
    if m:
        a, b, n = float(m[1]), float(m[2]), int(m[3])
        if n < 1:
            raise UserError(f"weights {spec!r}: the count in [] must be at least 1.")
        return [round(a + (b - a) * i / (n - 1), 6) if n > 1 else a for i in range(n)]
    m = re.fullmatch(r"(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*\(\s*\+?(-?[\d.]+)\s*\)", s)
    if m:
        a, b, step = float(m[1]), float(m[2]), float(m[3])
        if step <= 0 or b < a:
            raise UserError(f"weights {spec!r}: use a positive step from a lower to a higher weight.")
        n = int(round((b - a) / step)) + 1
        return [round(a + step * i, 6) for i in range(n)]
    try:
        vals = [float(x) for x in s.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise UserError(f"weights {spec!r}: write 0.7-1.5 [5], 0-1 (+0.25) or 0.5, 0.8, 1.") from None
    if not vals:
        raise UserError("weights are empty: write e.g. 0.7-1.5 [5].")
    return vals


def fmt_weight(w: float) -> str:
    return f"{w:g}"


def epoch_stems(folder: Path, output_name: Optional[str] = None) -> List[str]:
    """The run's files in training order: ``name-000001`` ... then the final ``name``."""
    folder = Path(folder)
    found = []
    for p in folder.glob("*.safetensors"):
        m = EPOCH_RE.match(p.stem)
        if m and (output_name is None or m["name"] == output_name):
            found.append((int(m["epoch"]), p.stem))
    found.sort()
    stems = [s for _, s in found]
    names = {EPOCH_RE.match(s)["name"] for s in stems} if stems else ({output_name} if output_name else set())
    for n in sorted(names):
        if (folder / f"{n}.safetensors").is_file():
            stems.append(n)
    return stems


def _quote(v: str) -> str:
    """The WebUI's infotext quoting: JSON-quote values holding ',', ':' or a newline."""
    return v if not any(c in v for c in ",:\n") else json.dumps(v, ensure_ascii=False)


def build_preset(stems: Sequence[str], *, weights: str = "0.7-1.5 [5]", trigger_words: str = "",
                 prompt: str = "", negative_prompt: str = "", seeds_variant: bool = False, seeds: str = "-1--1 [8]",
                 steps: int = 20, cfg_scale: float = 7.0, seed: int = 1234, width: int = 512, height: int = 512,
                 sampler: str = "Euler a", clip_skip: int = 1) -> XYZPreset:
    stems = list(stems)
    if not stems:
        raise UserError("This run has no epoch files yet: train at least one epoch first.")
    ws = parse_weights(weights) if not seeds_variant else [1.0]
    first_w = fmt_weight(ws[0])
    tag = f"<lora:{stems[0]}:{first_w}>"
    parts = [p for p in (trigger_words.strip(), prompt.strip()) if p]
    full_prompt = ", ".join(parts + [tag]) if parts else tag
    x_values = ", ".join(stems)
    if seeds_variant:
        y_type, y_values = "Seed", seeds
    else:
        y_type, y_values = "Prompt S/R", ", ".join(f":{fmt_weight(w)}>" for w in ws)
    params = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {cfg_scale:g}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Clip skip: {clip_skip}", "Script: X/Y/Z plot", "X Type: Prompt S/R",
              f"X Values: {_quote(x_values)}", f"Y Type: {y_type}", f"Y Values: {_quote(y_values)}"]
    infotext = f"{full_prompt}\nNegative prompt: {negative_prompt}\n" + ", ".join(params)
    return XYZPreset(prompt=full_prompt, negative_prompt=negative_prompt, x_type="Prompt S/R", x_values=x_values,
                     y_type=y_type, y_values=y_values, infotext=infotext, stems=stems, weights=ws, steps=steps,
                     cfg_scale=cfg_scale, seed=seed, width=width, height=height, sampler=sampler, clip_skip=clip_skip)


def grid_cells(preset: XYZPreset) -> List[List[str]]:
    """The prompt of each cell, rows = Y (weights), columns = X (epochs): what the script will render."""
    rows = []
    for w in preset.weights:
        rows.append([preset.prompt.replace(preset.stems[0], s).replace(f":{fmt_weight(preset.weights[0])}>",
                                                                       f":{fmt_weight(w)}>") for s in preset.stems])
    return rows
