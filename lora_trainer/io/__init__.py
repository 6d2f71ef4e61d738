"""File I/O: atomic writes, safetensors LoRA files, kohya metadata, WebUI-compatible hashes."""
