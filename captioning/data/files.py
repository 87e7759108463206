"""Writing generated data safely: a lock between processes, an atomic folder swap, file hashes.

Both the shapes generator and the resized-image cache write a folder in a staging place, add a
manifest last and rename the folder into place, so a reader never sees a half-written one.
"""

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
