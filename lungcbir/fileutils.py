"""Writing files safely: through a temporary file, fsynced, renamed over the target.

One helper for every file that must never be seen half-written: the FAISS index and its note
(:mod:`lungcbir.vector_index`) and model weights (:func:`lungcbir.inference.save_weights`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

#: A temporary file whose writer is gone (same machine), or unchanged for this long (a writer
#: elsewhere, or of an earlier version), is abandoned and removed by the next write.
STALE_TEMPORARY_SECONDS = 3600

_TEMPORARY_NAME = re.compile(r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.tmp")


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call ``write(temporary_path)``, fsync the result, then rename it over ``path``.

    Returns the SHA-256 of what was written. Readers see the old file or the new one, never a
    part. The temporary file (``<name>.<host>.<pid>.<random>.tmp``, same folder) is named after
    this machine and process, so the next write anywhere can tell an abandoned one (its writer
    was killed) from one another process is writing right now, and remove only the abandoned.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> digest = write_atomically(folder / "a.txt", lambda p: Path(p).write_text("hi"))
        >>> (folder / "a.txt").read_text(), len(digest), sorted(p.name for p in folder.iterdir())
        ('hi', 64, ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{_host_tag()}.{os.getpid()}.",
                                         suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            digest = sha256_of(written)
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return digest


def remove_abandoned_temporaries(path: Path) -> None:
    """Remove temporary files of ``path`` left by killed writers (see :func:`write_atomically`)."""
    host = _host_tag()
    for candidate in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
        match = _TEMPORARY_NAME.fullmatch(candidate.name[len(path.name) + 1:])
        try:
            age = time.time() - candidate.stat().st_mtime
        except OSError:
            continue  # finished or removed meanwhile
        gone = match is not None and match["host"] == host and not _process_alive(int(match["pid"]))
        if gone or age > STALE_TEMPORARY_SECONDS:
            with contextlib.suppress(OSError):
                candidate.unlink()


def sha256_of(handle: BinaryIO) -> str:
    """The SHA-256 (hex) of what is left to read in ``handle``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
