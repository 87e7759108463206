"""Writing generated data safely: a lock between processes, an atomic folder swap, file hashes, JSON.

The shapes generator and the caches (``captioning.data.cache``) all write a folder in a staging
place, add a manifest last and rename the folder into place, so a reader never sees a half-written
one. ``write_text`` and ``write_json`` do the same for one file (run summaries, reports, the
command-line tools' outputs), and ``check_writable`` / ``writing_alone`` let a command find an
unwritable output or a second writer before its work starts, not after.
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from captioning.errors import InputError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 22


@contextmanager
def locked(lock_file: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file``; other processes (e.g. DDP ranks) wait for it.

    With ``wait=False`` a lock held elsewhere raises ``BlockingIOError`` at once instead.
    """
    with open(lock_file, "w") as lock:
        # released when the file closes, also if this process dies
        fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def check_writable(path: Path, flag: str, folder: bool = False) -> None:
    """Raise ``InputError`` naming ``flag`` and ``path`` unless a file (or with ``folder``, files in it) can be
    written there; missing parent folders are created.

    A command calls this before loading a model or reading a dataset, so a typo in an output path costs
    a second, not the whole run. It writes (and removes) a probe file: permission bits alone miss
    read-only file systems.
    """
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder; give a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name")
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    except OSError as error:
        raise InputError(f"{flag} {path} cannot be written ({error.strerror or error}): "
                         "choose a writable location") from None


@contextmanager
def writing_alone(path: Path, flag: str) -> Iterator[None]:
    """Hold ``path``'s lock file (``.NAME.lock`` beside it) for the whole run, or raise ``InputError`` at once.

    The atomic ``write_text`` alone would make two runs on one output keep whichever finished last
    without a word; with this, the second run stops before its work and says why. The lock file
    stays (removing it would let a third run lock a file the first still holds).
    """
    lock_file = path.with_name(f".{path.name}.lock")
    try:
        with locked(lock_file, wait=False):
            yield
    except BlockingIOError:
        raise InputError(f"another process is writing {flag} {path} (it holds {lock_file}): wait for it to "
                         "finish or choose another output") from None


def remove_leftovers(parent: Path, patterns: Sequence[str]) -> None:
    """Delete the folders matching ``patterns`` in ``parent``: what writers killed mid-write left, logged.

    Call it holding the lock those writers hold while they write (``locked``): a live writer then owns
    none of them, and a dead one's lock was released with its process, so what matches was left by a
    writer that died. (Where flock does not hold, on some network file systems, a live writer's folder
    could be removed; it then fails on its next file instead of finishing a partial copy.)
    """
    for pattern in patterns:
        for leftover in sorted(parent.glob(pattern)):
            log.warning("removing %s, left by an interrupted write", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


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


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path of this writer's own beside ``path``, renamed over ``path`` when the block succeeds.

    A reader (or a crash) sees the old file or the whole new one, never a truncated one; a failed
    block leaves ``path`` as it was and removes the temporary file. The name is unique to the
    process and call, so two writers never share one.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str, errors: str = "strict") -> None:
    """Write ``text`` as UTF-8 through ``replacing``: the old file or the whole new one, never half.

    The text is encoded before any file is touched, so an encoding error (``errors="strict"``)
    leaves ``path`` as it was; ``errors="surrogateescape"`` writes file names that are not UTF-8
    back as their own bytes.
    """
    data = text.encode("utf-8", errors)
    with replacing(path) as partial, open(partial, "xb") as handle:  # created with the umask, as open() does
        handle.write(data)


def write_json(path: Path, data: Any) -> None:
    """Write then rename (``write_text``), so a reader sees the old file or the whole new one.

    Strict JSON only: a NaN or an infinity (which ``json`` would write as the non-JSON ``NaN``) is
    refused with a ``ValueError`` naming the file, and nothing is written.
    """
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError:
        where = _nonfinite_entry(data)
        raise ValueError(f"{path} is not written: {where or 'a value'} is not a finite number, which strict JSON "
                         "cannot hold (a diverged run, e.g. a learning rate too high, produces such numbers)") from None
    write_text(path, text)


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

