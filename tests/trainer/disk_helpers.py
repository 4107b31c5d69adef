"""Helpers of the disk-error tests (no tests here): a full disk and a read-only folder, made
on purpose at the point where a run writes.

- :func:`disk_full_at`: the ``n``-th file opened by :func:`os.fdopen` (how
  ``reclight.trainer.checkpoint.atomic_torch_save`` opens its temp file) fails its first write
  with ``ENOSPC``, as a full disk does; torch's zip writer then raises its own "enforce fail at
  inline_container.cc" with the ``OSError`` as context, the path a real full disk takes
  (checked by hand on a 256 KiB tmpfs: same message).
- :func:`read_only`: ``chmod 555`` the folder; where that does not stop writes (the tests run as
  root, which ignores permission bits), every ``os.open`` that may create or write, and every
  ``os.mkdir``, under the folder fails with ``EACCES`` instead, as for a non-root user.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def disk_full_at(monkeypatch, n: int, room: int = 4096) -> list[str]:
    """Make the ``n``-th (1-based) ``os.fdopen`` file fail with ENOSPC once ``room`` bytes are
    written to it (a disk that fills during the write); returns the files' names so far."""
    real = os.fdopen
    opened: list[str] = []

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        opened.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else str(fd))
        if len(opened) == n:
            real_write, written = f.write, [0]

            def write(data):
                written[0] += len(data)
                if written[0] > room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(data)

            f.write = write
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return opened


def _under(path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(folder)
    except TypeError:  # an fd-relative call
        return False


def read_only(folder: Path, monkeypatch, request) -> bool:
    """Make ``folder`` (created if needed) refuse writes until the test ends; returns True where
    chmod alone does it (not root), False where the refusal is injected."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    request.addfinalizer(lambda: folder.chmod(0o755))  # so that tmp_path can be removed
    probe = folder / ".write-probe"
    try:
        probe.write_text("x")
        probe.unlink()
    except PermissionError:
        return True
    real_open, real_mkdir = os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def open_(path, flags, *args, **kwargs):
        if flags & writes and _under(path, folder):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if _under(path, folder):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return False
