"""Registration with the WebUI's callbacks (called from scripts/lora_trainer.py at script load)."""
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

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
