"""Atomic file writes: a temporary file in the target folder, fsync, then rename over the target.

A crash or a full disk leaves either the old file or the new one, never a half-written file.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            from .. import faults
            faults.maybe_raise("write")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.errno == errno.ENOSPC:
            raise UserError(f"The disk is full: could not write {path}. Free some space "
                            f"(older epoch files can go, or lower save_last_n_epochs) and run again; "
                            f"files already written are intact.") from None
        raise
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
