"""Optimizer and learning-rate schedule registries, and the config -> (optimizer, schedule) glue."""
from .optimizers import (OPTIMIZERS, create_optimizer, eval_mode, is_schedule_free, known_names,  # noqa: F401
                         recommended_args, train_mode)
from .schedules import ALL_NAMES as SCHEDULE_NAMES, SCHEDULES, create_schedule, warmup_steps  # noqa: F401
from .setup import build, lr_curve, setting_problems, setting_warnings  # noqa: F401
