"""WebUI entry of sd-webui-lora-trainer: registers the Train LoRA tab and the HTTP API. Thin glue;
everything else lives in the ``lora_trainer`` package."""
from modules import script_callbacks  # noqa: F401  (only imported by the WebUI)

from lora_trainer.webui import entry

entry.register(script_callbacks)
