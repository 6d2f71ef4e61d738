"""Post-training tools on LoRA files: resize, check, merge, extract, combine."""
