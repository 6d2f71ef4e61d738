"""Training state for resuming a run: the network, optimizer, schedule and grad scaler, where the run
stands (epoch, batches done in it, optimizer steps), every random generator, the losses so far, the
epoch files kept, the config, and fingerprints of the model, VAE, network shape and dataset.

One file per run, ``<output_dir>/<output_name>.trainstate``, replaced atomically at each epoch end, on
a timer, and on Stop. Its suffix is none the WebUI's Lora list picks up (it lists .safetensors, .pt,
.ckpt). Resuming refuses another model, network shape or dataset with the reason; more epochs or a
later stop are fine.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import UserError

STATE_SUFFIX = ".trainstate"
FORMAT = "sd-webui-lora-trainer/state/1"

# config fields that may differ on resume: when to stop, what and how often to save, samples, logs
SAFE_CHANGES = {"max_train_epochs", "max_train_steps", "save_every_n_epochs", "save_last_n_epochs",
                "save_precision", "training_comment", "sample_prompts", "sample_every_n_epochs", "sample_sampler",
                "logging_dir", "log_prefix", "save_state", "save_state_every_n_minutes", "resume", "output_dir",
                "max_data_loader_n_workers", "persistent_data_loader_workers", "cache_latents_to_disk",
                "pretrained_model_name_or_path", "model_config", "vae"}


def state_path(output_dir, output_name: str) -> Path:
    return Path(output_dir) / f"{output_name}{STATE_SUFFIX}"


def dataset_fingerprint(items) -> str:
    """Which images, their sizes on disk, captions and repeats (not their paths' prefix: a moved dataset is the same)."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.concept, i.path.name)):
        size = it.path.stat().st_size if it.path.exists() else -1
        h.update(json.dumps([it.concept, it.path.name, size, it.caption, it.repeats]).encode())
    return h.hexdigest()[:16]


def network_shape(network) -> Dict[str, List[int]]:
    return {k: list(v.shape) for k, v in network.state_dict().items()}


def rng_state(caption_rng: random.Random) -> Dict[str, Any]:
    out = {"torch": torch.get_rng_state(), "python_caption": caption_rng.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict[str, Any], caption_rng: random.Random) -> None:
    torch.set_rng_state(state["torch"])
    caption_rng.setstate(_tuplify(state["python_caption"]))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:   # another number of GPUs: the rest of the run differs in its noise only
            pass


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# The file is safetensors (tensors) + its metadata (everything else as JSON, tensors by reference): it
# loads without unpickling, so the WebUI's safe-unpickler hook on torch.load does not reject it.
def _encode(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__map__": {k: _encode(v, tensors) for k, v in obj.items()}}
        return {"__pairs__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def _decode(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__map__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__map__"].items()}
        if "__pairs__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__pairs__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_decode(v, tensors) for v in obj["__list__"]]
    return obj


def save(path: Path, state: Dict[str, Any]) -> None:
    from safetensors.torch import save as st_save
    from ..io.atomic import atomic_write_bytes
    tensors: Dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(dict(state, format=FORMAT), tensors))
    if not tensors:
        tensors["_"] = torch.zeros(1)
    atomic_write_bytes(Path(path), st_save(tensors, metadata={"format": FORMAT, "state": structure}))


def _read(path: Path, with_tensors: bool = True) -> Dict[str, Any]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    structure = json.loads(meta["state"])
    if not with_tensors:   # the plain values only (for listing runs)
        return {k: v for k, v in structure["__map__"].items() if not isinstance(v, dict)}
    return _decode(structure, tensors)


def load(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():   # sd-scripts' --save_state folders, or a run folder
        cand = sorted(path.glob(f"*{STATE_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        if not cand:
            raise UserError(f"{path} holds no {STATE_SUFFIX} file: resume takes this trainer's state file "
                            "(<output_dir>/<output_name>.trainstate); sd-scripts' state folders cannot be resumed here.")
        path = cand[-1]
    if not path.is_file():
        raise UserError(f"No training state at {path}: this run has not saved one yet (states are written at each "
                        "epoch end, on the timer and on Stop). Start the run without resume.")
    try:
        state = _read(path)
    except Exception as e:
        raise UserError(f"{path.name} is not a readable training state of this trainer ({type(e).__name__}: it is "
                        "damaged or another program's). Resume from an epoch file instead (network_weights = that "
                        "file) or start again.") from None
    state["path"] = str(path)
    return state


def compatibility_problems(state: Dict[str, Any], *, config: Dict[str, Any], model: Dict[str, str], vae: str,
                           network: Dict[str, List[int]], dataset: str) -> List[str]:
    """Why this run cannot continue from ``state`` (empty: it can)."""
    p: List[str] = []
    fp = state.get("fingerprints", {})
    if fp.get("model") and model and fp["model"] != model:
        p.append(f"the state was trained on {fp['model'].get('sd_model_name') or 'another model'} "
                 f"({fp['model'].get('sd_model_hash', '?')}), not the loaded {model.get('sd_model_name') or 'model'} "
                 f"({model.get('sd_model_hash', '?')}): load that model to resume.")
    if fp.get("vae") and vae and fp["vae"] != vae:
        p.append("the VAE differs from the one the run started with: select the same VAE to resume.")
    if fp.get("network") != network:
        p.append("the network's shape differs (network_module, network_dim, network_args or trained parts changed): "
                 "use the run's settings to resume.")
    if fp.get("dataset") != dataset:
        p.append("the dataset differs (images, captions or repeats changed since the run started): restore it, or "
                 "start a new run (network_weights = an epoch file carries the learned weights over).")
    old = state.get("config", {})
    changed = sorted(k for k in set(old) | set(config)
                     if k not in SAFE_CHANGES and k != "unknown" and old.get(k) != config.get(k))
    if changed:
        p.append(f"settings changed since the run started: {', '.join(changed)}. Only when to stop, what to save, "
                 "samples and logs may change on resume.")
    return p


def unfinished_runs(root: Path) -> List[Dict[str, Any]]:
    """States under ``root`` whose run did not finish, newest first (for the tab's Resume list)."""
    out = []
    if not Path(root).is_dir():
        return out
    for p in Path(root).rglob(f"*{STATE_SUFFIX}"):
        try:
            s = _read(p, with_tensors=False)
        except Exception:
            continue
        if not s.get("finished"):
            out.append({"path": str(p), "output_name": s.get("output_name") or p.stem,
                        "epoch": s.get("epoch", 0), "step": s.get("step", 0),
                        "total_steps": s.get("total_steps", 0), "mtime": p.stat().st_mtime})
    return sorted(out, key=lambda r: -r["mtime"])
