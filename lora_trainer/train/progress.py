"""What the loop tells its front end, and what the front end may ask of it, polled between steps.

Callbacks never raise into the loop: a failing callback is logged and ignored.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

log = logging.getLogger(__name__)


@dataclass
class Progress:
    phase: str = "idle"          # preparing | caching | training | saving | sampling | done | stopped | error
    epoch: int = 0
    total_epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: Optional[float] = None       # latest synced step loss
    epoch_loss: Optional[float] = None  # mean loss of the last finished epoch
    lr: Optional[float] = None
    elapsed: float = 0.0
    eta: Optional[float] = None
    message: str = ""
    stopped: bool = False
    files: List[str] = field(default_factory=list)
    samples: List[str] = field(default_factory=list)
    step_losses: List[tuple] = field(default_factory=list)    # (step, loss) synced so far
    epoch_losses: List[tuple] = field(default_factory=list)   # (epoch, mean loss)
    memory: dict = field(default_factory=dict)                 # lora_trainer.memory figures (epoch ends)
    warnings: List[str] = field(default_factory=list)          # dataset and setting warnings of the run
    memory_text: str = ""


class Commands:
    """Stop requests from the UI/API; thread-safe."""

    def __init__(self):
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()


class Callbacks:
    def __init__(self, on_progress: Optional[Callable[[Progress], None]] = None):
        self._on_progress = on_progress

    def progress(self, p: Progress) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(p)
        except Exception:  # never let the UI break training
            log.exception("progress callback failed")
