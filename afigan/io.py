"""The one atomic writer: files, JSON and checkpoints reach their final name whole or not at all.

Every writer here writes a temporary file beside the target (same folder, so the rename stays on
one file system), flushes and fsyncs it, and renames it over the target with :func:`os.replace`.
A writer that raises (a full disk, a bug, Ctrl-C) removes its temporary file and leaves the old
target untouched; a process killed outright leaves only a hidden ``.<name>.<random>.tmp``, which
the next write of the same target removes.
"""

import contextlib
import glob
import json
import os
import tempfile
from typing import Any, Callable, Union

__all__ = ["atomic_open", "atomic_write", "atomic_write_json", "atomic_torch_save"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing (``mode`` "w"/"wb"); on a clean exit it is
    flushed, synced and renamed over ``path``, on any exception it is removed and ``path`` is
    untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A process killed (SIGKILL) while writing ``path`` left its temporary file behind: drop it now.
    pattern = os.path.join(glob.escape(directory), glob.escape("." + os.path.basename(path)) + ".*.tmp")
    for stale in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.remove(stale)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file 0600; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, data: Union[bytes, str, Callable[[Any], Any]]) -> str:
    """Write ``data`` to ``path`` atomically and return ``path``.

    ``data`` is bytes (written in binary), str (written as text) or a callable that receives the
    open binary file and writes into it (e.g. ``lambda f: torch.save(obj, f)`` or a ZipFile).
    """
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as f:
            f.write(data)
    elif isinstance(data, str):
        with atomic_open(path, "w") as f:
            f.write(data)
    elif callable(data):
        with atomic_open(path, "wb") as f:
            data(f)
    else:
        raise TypeError(f"atomic_write({path!r}): data must be bytes, str or a callable, not {type(data).__name__}.")
    return path


def atomic_write_json(path: str, obj: Any, **json_kwargs) -> str:
    """``json.dump(obj, f, **json_kwargs)`` into ``path`` atomically. The object is serialised
    before the file is opened, so an unserialisable object leaves the old file as it was."""
    return atomic_write(path, json.dumps(obj, **json_kwargs))


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save(obj, path)`` atomically (same argument order as ``torch.save``)."""
    import torch  # here, so that writing JSON never needs torch

    return atomic_write(path, lambda f: torch.save(obj, f))
