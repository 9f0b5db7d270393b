"""Writing files atomically: a temporary file in the same folder, then a rename, so that a crash or a
kill never leaves a half-written file under the final name (and a reader sees the old file or the new)."""

from __future__ import annotations

import os
import uuid
from typing import Callable


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> str:
    """Write ``data`` (text is UTF-8, line ends as given) to ``path``, creating its folder. ``data`` may
    also be a function that writes the file at the path it is given (e.g. safetensors' save_file), so a
    large file is never held in memory as a whole. The file gets the usual permissions (the umask's)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
        with os.fdopen(fd, "wb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not callable(data):
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if callable(data):
            data(tmp)
            os.chmod(tmp, mode)  # a writer may set its own mode (safetensors' save_file makes files 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)
