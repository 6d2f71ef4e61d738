"""Where a run started in the WebUI (the tab or the HTTP API) may write.

Every write of a run goes under the Lora folder or a folder named in the setting *Folders training
runs may write to* (Settings → LoRA Trainer): ``output_dir`` (epoch files, training state, sample
images), ``logging_dir`` (+ ``log_prefix``), and, with ``cache_latents`` + ``cache_latents_to_disk``, the
``.lora_trainer_cache`` folders beside the dataset's images. Anything else needs the opt-in setting *Allow
training runs to write anywhere*, which is honoured only where the WebUI would let a user install
extensions: not while it listens on the network (``--listen``, ``--share``, ``--ngrok``,
``--server-name``) without ``--enable-insecure-extension-access`` (the WebUI's own
``cmd_opts.disable_extension_access``). Both settings are closed to ``/sdapi/v1/options``
(``restrict_api``) and locked by ``--hide-ui-dir-config`` like the WebUI's own output folders, so a
request cannot open the door it then walks through. Paths are checked after resolving symlinks and
``..`` (relative ones against the WebUI's working directory, where the run would write).

The checks are plain functions of a config and a :class:`WritePolicy`; only :func:`current_policy` and
:func:`register_settings` read the WebUI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ..config import TrainConfig
from ..errors import ConfigError, UserError

SECTION = ("lora_trainer", "LoRA Trainer")
ROOTS_KEY = "lora_trainer_write_roots"
ANYWHERE_KEY = "lora_trainer_write_anywhere"
ROOTS_LABEL = "Folders training runs may write to, besides the Lora folder (one per line)"
ANYWHERE_LABEL = "Allow training runs (tab and API) to write anywhere"
NETWORK_FLAGS = "--listen, --share, --ngrok or --server-name"


@dataclass
class WritePolicy:
    lora_dir: Path
    extra_roots: List[Path] = field(default_factory=list)
    anywhere: bool = False           # the opt-in is set ...
    network_exposed: bool = False    # ... but the WebUI listens on the network without the insecure flag

    @property
    def anywhere_honoured(self) -> bool:
        return self.anywhere and not self.network_exposed

    def roots(self) -> List[Path]:
        return [resolved(p) for p in [self.lora_dir, *self.extra_roots]]


def resolved(p) -> Path:
    """Absolute, with symlinks and ``..`` resolved (a missing tail is kept as written, then normalised)."""
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def parse_roots(text: str) -> List[Path]:
    """The setting's folders: one per line (``;`` also separates); blank lines ignored."""
    parts = [x.strip() for line in (text or "").splitlines() for x in line.split(";")]
    return [Path(x) for x in parts if x]


def path_problem(what: str, value: str, target: Path, policy: WritePolicy, shown_target: str = "") -> Optional[str]:
    """None when ``target`` (the resolved place ``what`` = ``value`` writes to) is allowed, else the message."""
    if policy.anywhere_honoured:
        return None
    roots = policy.roots()
    if inside(target, roots):
        return None
    shown_target = shown_target or str(target)
    shown = f"{value!r}" + (f" (resolves to {shown_target})" if shown_target != str(value) else "")
    where = ", ".join(str(r) for r in roots)
    msg = (f"{what} {shown} is outside the folders a run started in the WebUI may write to ({where}). "
           f"Choose a folder under one of them, or add the folder in Settings → {SECTION[1]} → "
           f"\"{ROOTS_LABEL}\".")
    if policy.anywhere:
        msg += (f" (\"{ANYWHERE_LABEL}\" is on but ignored: the WebUI listens on the network ({NETWORK_FLAGS}) "
                "without --enable-insecure-extension-access.)")
    return msg


def write_problems(cfg: TrainConfig, policy: WritePolicy, image_paths: Sequence[Path] = ()) -> List[str]:
    """Every place the run would write that the policy does not allow, each message with the fix.
    ``image_paths``: the dataset's images (their folders get the on-disk latent cache)."""
    problems: List[str] = []
    if cfg.output_dir:
        p = path_problem("output_dir", cfg.output_dir, resolved(cfg.output_dir), policy)
        if p:
            problems.append(p + " Or leave output_dir empty: it becomes <Lora folder>/<output_name>.")
    if cfg.logging_dir:
        # the log folder is logging_dir/<log_prefix><time>: a prefix with '..' or '/' must not lead out
        target = resolved(Path(cfg.logging_dir) / f"{cfg.log_prefix}0")
        what = "logging_dir" + (f" with log_prefix {cfg.log_prefix!r}" if cfg.log_prefix else "")
        p = path_problem(what, cfg.logging_dir, target, policy, shown_target=str(target)[:-1] + "<time>")
        if p:
            problems.append(p + " Or leave logging_dir empty (no TensorBoard logs).")
    if cfg.cache_latents and cfg.cache_latents_to_disk:
        from ..dataset.latent_cache import cache_path
        seen = set()
        for img in image_paths:
            folder = resolved(cache_path(Path(img)).parent)
            if folder in seen:
                continue
            seen.add(folder)
            p = path_problem("cache_latents_to_disk writes the latent cache to", str(folder), folder, policy)
            if p:
                problems.append(p + " Or set cache_latents_to_disk = false (the cache then stays in memory).")
                break
    return problems


def check_writes(cfg: TrainConfig, image_paths: Sequence[Path] = (), policy: Optional[WritePolicy] = None) -> None:
    problems = write_problems(cfg, policy or current_policy(), image_paths)
    if problems:
        raise ConfigError(problems)


def check_path(what: str, path: Path, policy: Optional[WritePolicy] = None) -> None:
    """A single file the tab writes (e.g. a saved config): UserError unless it is allowed."""
    problem = path_problem(what, str(path), resolved(path), policy or current_policy())
    if problem:
        raise UserError(problem)


# ------------------------------------------------------------------ the WebUI side
def current_policy() -> WritePolicy:
    from modules import shared
    from .runtime import lora_dir
    opts = shared.opts
    cmd = shared.cmd_opts
    exposed = getattr(cmd, "disable_extension_access", None)
    if exposed is None:  # not computed by this WebUI version: its rule
        exposed = any(getattr(cmd, k, None) for k in ("share", "listen", "ngrok", "server_name")) \
            and not getattr(cmd, "enable_insecure_extension_access", False)
    return WritePolicy(lora_dir=lora_dir(), extra_roots=parse_roots(str(getattr(opts, ROOTS_KEY, "") or "")),
                       anywhere=bool(getattr(opts, ANYWHERE_KEY, False)), network_exposed=bool(exposed))


def register_settings() -> None:
    """Settings → LoRA Trainer (called from the WebUI's on_ui_settings)."""
    import gradio as gr
    from modules import shared
    hide = getattr(shared, "hide_dirs", {})
    shared.opts.add_option(ROOTS_KEY, shared.OptionInfo(
        "", ROOTS_LABEL, gr.Textbox, {"lines": 2, **hide}, section=SECTION, restrict_api=True,
    ).info("output_dir, logging_dir and an on-disk latent cache must lie under the Lora folder or one of these"))
    shared.opts.add_option(ANYWHERE_KEY, shared.OptionInfo(
        False, ANYWHERE_LABEL, gr.Checkbox, {"interactive": True, **hide}, section=SECTION, restrict_api=True,
    ).info(f"off by default; ignored while the WebUI listens on the network ({NETWORK_FLAGS}) without "
           "--enable-insecure-extension-access"))
    restricted = getattr(shared, "restricted_opts", None)
    if restricted is not None:  # --hide-ui-dir-config locks them, as the WebUI's output folders
        restricted.update({ROOTS_KEY, ANYWHERE_KEY})
