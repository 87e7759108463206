"""Writing generated data safely: a lock between processes, an atomic folder swap, file hashes, JSON.

The shapes generator and the caches (``captioning.data.cache``) all write a folder in a staging
place, add a manifest last and rename the folder into place, so a reader never sees a half-written
one. ``write_json`` does the same for one file (run summaries, reports).
"""

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 22


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file``; other processes (e.g. DDP ranks) wait for it."""
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, removing a stale generated ``target`` first."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(source, target)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in chunks (cache shards can be larger than one wants in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write then rename, so a reader sees the old file or the whole new one.

    Strict JSON only: a NaN or an infinity (which ``json`` would write as the non-JSON ``NaN``) is
    refused with a ``ValueError`` naming the file, and nothing is written.
    """
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError:
        where = _nonfinite_entry(data)
        raise ValueError(f"{path} is not written: {where or 'a value'} is not a finite number, which strict JSON "
                         "cannot hold (a diverged run, e.g. a learning rate too high, produces such numbers)") from None
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _nonfinite_entry(data: Any, where: str = "") -> str | None:
    """Where the first NaN/infinity of ``data`` is, e.g. ``['val/loss'] (nan)``; None if none."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'} ({data})"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for key, value in items:
        found = _nonfinite_entry(value, f"{where}[{key!r}]")
        if found:
            return found
    return None


def read_json_or_none(path: Path) -> Any:
    """The file's JSON, or None when it is missing or not JSON (a cache then counts as absent)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

