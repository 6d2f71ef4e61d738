"""Errors meant for the user: each message names the bad value and how to fix it."""


class UserError(Exception):
    """A mistake the user can fix (bad setting, bad dataset, missing file). Shown without a traceback."""


class ConfigError(UserError):
    """One or more settings are invalid. ``problems`` lists one message per bad setting."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("Invalid settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


class DatasetError(UserError):
    """The dataset folder cannot be used as it is."""


class TrainingDiverged(UserError):
    """The network's weights became NaN/Inf; nothing was saved from the broken state."""


class StopRequested(Exception):
    """Raised inside the loop when the front end asked to stop (finished epochs are kept)."""
