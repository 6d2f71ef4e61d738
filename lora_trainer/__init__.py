"""sd-webui-lora-trainer core: trains kohya-compatible LoRA networks on a model host.

The core never imports the WebUI. Front ends (the WebUI tab in ``lora_trainer.webui``, the CLI in
``lora_trainer.cli``) build a :class:`~lora_trainer.config.TrainConfig` and a host, then call
:func:`lora_trainer.run.train`.
"""

__version__ = "0.1.0"
