"""Optimizer and learning-rate schedule registries."""
from .optimizers import OPTIMIZERS, create_optimizer  # noqa: F401
from .schedules import SCHEDULES, create_schedule, warmup_steps  # noqa: F401
