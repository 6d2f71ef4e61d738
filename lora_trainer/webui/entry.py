"""Registration with the WebUI's callbacks (called from scripts/train_lora_tab.py at script load): the tab,
the settings (Settings → LoRA Trainer: where runs may write) and the HTTP API."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register(script_callbacks) -> None:
    from . import api

    def on_ui_tabs():
        from .tab import create_tab
        return create_tab()

    def on_app_started(demo, app):
        api.register(demo, app)

    def on_ui_settings():
        from .write_roots import register_settings
        register_settings()

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
