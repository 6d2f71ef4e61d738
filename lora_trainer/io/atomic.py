"""Atomic file writes: a temporary file in the target folder, fsync, then rename over the target.

A crash or a full disk leaves either the old file or the new one, never a half-written file.

The temporary file is created the way ``open(path, "w")`` creates a file (mode 0o666 less the process's
umask: 0o644 under umask 022), not as ``tempfile.mkstemp`` does (always 0o600), because its mode is the
saved file's mode after the rename. Replacing an existing file keeps that file's mode, as writing into
it would.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Tuple

from ..errors import UserError


def create_temp_beside(path: Path) -> Tuple[int, str]:
    """A new, empty ``.<name>.<random>.tmp`` in ``path``'s folder (the pattern stale-file clean-up looks
    for), opened for writing: ``(fd, temp path)``. Created with mode 0o666, so the umask decides, as for
    any ordinary file; ``O_EXCL`` never opens an existing file or follows a planted link."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def keep_mode_of(path: Path, tmp: str) -> None:
    """Give ``tmp`` the mode of the file it is about to replace, if there is one."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    os.chmod(tmp, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            from .. import faults
            faults.maybe_raise("write")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        keep_mode_of(path, tmp)
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
