"""Atomic file writes: every output appears under its final name only when complete.

A file is written to a temporary name in the same folder and renamed with
``os.replace``, which is atomic on POSIX file systems, so a job killed mid-write
leaves at most a ``.tmp`` file and never a truncated file under the real name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite_or_none(value: Any) -> Any:
    """Replace NaN and infinities, which JSON cannot represent, with None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, standard JSON (non-finite numbers become null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV, with ``nan`` for missing values."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, na_rep="nan")


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str | os.PathLike, error_type: type[Exception], message: str, map_location: Any = "cpu") -> Any:
    """Load a file written by ``torch_save`` with ``weights_only=True``.

    A damaged file raises ``error_type`` with ``message`` and torch's reason
    appended. A missing file raises FileNotFoundError, as in ``torch.load``.
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types for a damaged file
        reason = str(error).strip().splitlines()[0]
        raise error_type(f"{message} (torch: {reason})") from error
