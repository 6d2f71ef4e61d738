"""The training loop and its parts: noise and loss, precision, progress and commands."""
