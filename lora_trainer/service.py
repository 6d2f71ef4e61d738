"""One training run at a time, in a background thread, with status for a UI or an HTTP API.

Front ends (the WebUI tab and its API) call :meth:`TrainingService.start` with a config; the run
happens in a thread that enters the host's lock; :meth:`status` is a plain dict for JSON. No
WebUI imports here: the host factory and hooks come from the front end.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .config import TrainConfig
from .errors import UserError
from .run import RunResult, train
from .train.progress import Callbacks, Commands, Progress

log = logging.getLogger(__name__)


class Busy(UserError):
    """A run is already active."""


class TrainingService:
    def __init__(self, host_factory: Callable[[TrainConfig], Any], *,
                 prepare_config: Optional[Callable[[TrainConfig], TrainConfig]] = None,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 on_saved: Optional[Callable[[Path, Dict[str, str]], None]] = None,
                 on_finished: Optional[Callable[["TrainingService"], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None):
        self._host_factory = host_factory
        self._prepare_config = prepare_config
        self._on_progress = on_progress
        self._on_saved = on_saved
        self._on_finished = on_finished
        self._should_stop = should_stop
        self._lock = threading.Lock()
        self.state = "idle"            # idle | running | stopping | done | error | stopped
        self.run_id: Optional[str] = None
        self.config: Optional[TrainConfig] = None
        self.progress = Progress()
        self.result: Optional[RunResult] = None
        self.error: Optional[str] = None
        self.commands = Commands()
        self.thread: Optional[threading.Thread] = None
        self.started_at: Optional[float] = None
        self.history: List[Dict[str, Any]] = []   # finished runs: run_id, output_name, output_dir, files

    # ------------------------------------------------------------ control
    def is_active(self) -> bool:
        return self.state in ("running", "stopping")

    def start(self, cfg: TrainConfig, *, wait: bool = False) -> str:
        """Validate and start a run. Raises :class:`Busy` or :class:`UserError` (nothing started)."""
        with self._lock:
            if self.is_active():
                raise Busy(f"A training run ({self.run_id}) is already active: stop it or wait for it to finish.")
            if self._prepare_config is not None:
                cfg = self._prepare_config(cfg)
            cfg.validate()
            self.run_id = uuid.uuid4().hex[:12]
            self.config = cfg
            self.progress = Progress()
            self.result = None
            self.error = None
            self.commands = Commands()
            self.state = "running"
            self.started_at = time.time()
            self.thread = threading.Thread(target=self._run, args=(cfg, self.run_id), name="lora-trainer", daemon=True)
            self.thread.start()
        if wait:
            self.thread.join()
        return self.run_id

    def stop(self) -> bool:
        if not self.is_active():
            return False
        self.state = "stopping"
        self.commands.request_stop()
        return True

    def wait(self, timeout: Optional[float] = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------ the run
    def _progress(self, p: Progress) -> None:
        if self._should_stop is not None and self._should_stop() and not self.commands.stop_requested():
            self.stop()
        if self._on_progress is not None:
            self._on_progress(p)

    def _run(self, cfg: TrainConfig, run_id: str) -> None:
        try:
            host = self._host_factory(cfg)
            self.result = train(cfg, host, callbacks=Callbacks(self._progress), commands=self.commands,
                                progress=self.progress, on_saved=self._on_saved)
            self.state = "stopped" if self.result.stopped else "done"
        except UserError as e:
            self.error = str(e)
            self.state = "error"
            self.progress.phase = "error"
        except Exception as e:  # a bug or an environment failure: keep the trace for the log
            log.error("training run %s failed:\n%s", run_id, traceback.format_exc())
            self.error = _friendly(e)
            self.state = "error"
            self.progress.phase = "error"
        finally:
            self.history.append({"run_id": run_id, "output_name": cfg.output_name, "output_dir": cfg.output_dir,
                                 "files": [str(f) for f in (self.result.files if self.result else [])],
                                 "state": self.state})
            if self._on_finished is not None:
                try:
                    self._on_finished(self)
                except Exception:
                    log.exception("on_finished hook failed")

    # ------------------------------------------------------------ reporting
    def status(self) -> Dict[str, Any]:
        p = self.progress
        return {
            "state": self.state, "run_id": self.run_id, "phase": p.phase, "epoch": p.epoch,
            "total_epochs": p.total_epochs, "step": p.step, "total_steps": p.total_steps, "loss": p.loss,
            "epoch_loss": p.epoch_loss, "lr": p.lr, "elapsed": p.elapsed, "eta": p.eta, "message": p.message,
            "files": list(p.files), "samples": list(p.samples), "error": self.error,
            "memory": dict(p.memory), "memory_text": p.memory_text, "warnings": list(p.warnings),
            "output_name": self.config.output_name if self.config else None,
            "output_dir": self.config.output_dir if self.config else None,
        }

    def run_info(self, run_id: Optional[str]) -> Optional[Dict[str, Any]]:
        if run_id is None or run_id == self.run_id:
            if self.config is None:
                return None
            return {"run_id": self.run_id, "output_name": self.config.output_name,
                    "output_dir": self.config.output_dir, "files": list(self.progress.files), "state": self.state}
        for h in reversed(self.history):
            if h["run_id"] == run_id:
                return h
        return None


def _friendly(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    if "out of memory" in str(e).lower():
        return ("The GPU ran out of memory. Pick the preset for a smaller card, or lower train_batch_size / "
                "resolution, turn on gradient_checkpointing and cache_latents, or train the UNet only. "
                f"({text})")
    return text
