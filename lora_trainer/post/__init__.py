"""Post-training tools on LoRA files: resize, check, merge into a checkpoint, extract, combine.

Plain functions for any front end (the CLI in :mod:`.cli`, the WebUI tab); each returns a report
dataclass with ``lines()`` and raises :class:`lora_trainer.errors.UserError` for user mistakes,
having written nothing. Imported lazily (``from lora_trainer.post import resize_lora``), so the CLI's
argument parsing does not load torch.
"""
import importlib

_EXPORTS = {
    "check_lora": "check", "CheckReport": "check",
    "combine_loras": "combine", "CombineReport": "combine",
    "extract_lora": "extract", "ExtractReport": "extract",
    "merge_lora_into_checkpoint": "merge", "MergeReport": "merge",
    "resize_lora": "resize", "ResizeReport": "resize",
    "Algorithm": "lora_math", "register_algorithm": "lora_math",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
