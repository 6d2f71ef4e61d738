"""TensorBoard logs (step loss, lr per group, epoch mean loss) under logging_dir/<log_prefix><time>."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class TBLogger:
    def __init__(self, logging_dir: str, log_prefix: str = ""):
        self.writer = None
        self.path: Optional[Path] = None
        if not logging_dir:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # tensorboard not installed
            log.warning("TensorBoard logging is off: %s. Install the 'tensorboard' package to get loss curves.", e)
            return
        self.path = Path(logging_dir) / f"{log_prefix}{time.strftime('%Y%m%d%H%M%S')}"
        self.writer = SummaryWriter(str(self.path))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
