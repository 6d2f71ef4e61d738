"""CLI subcommands of the post-training tools (added to ``python -m lora_trainer``)."""


def add_post_commands(sub) -> None:
    """Registers the post-tool subcommands (none yet)."""
