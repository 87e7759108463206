"""Agreement of the pure-Python PTB tokenizer with the Java one on real captions, and their speed.

Tokenizes every caption of a COCO captions file with the Java tokenizer the evaluator uses (one
``ptb_tokenize`` call, all captions one per line) and with the Python reimplementation: its batch
form (the same lines, scanned together, which is what Java sees) and its per-caption form
(``ptb_tokenize_python``, what ``ptb_tokenize([caption])`` would give). Prints a table and up to 20
differing captions; writes JSON with ``--json FILE``.

    python benchmarks/ptb_agreement.py --json ptb_agreement.json
"""

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from captioning.data.tokenize import ptb_tokenize_python, ptb_tokenize_python_batch
from captioning.evaluation.tokenizer import ptb_tokenize

SHARED_DIR = Path(os.environ.get("CAPTIONING_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_ANNOTATIONS = SHARED_DIR / "data" / "coco-val2017-mini" / "annotations" / "captions_val2017.json"
SHOWN_DIFFERENCES = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS,
                        help="COCO captions JSON (annotations[*].caption)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def timed(tokenize: Callable[[Sequence[str]], list[str]], captions: Sequence[str]) -> tuple[list[str], float]:
    start = time.perf_counter()
    tokenized = tokenize(captions)
    return tokenized, time.perf_counter() - start


def compare(captions: Sequence[str], java: list[str], python: list[str], seconds: float) -> dict:
    differences = [{"index": i, "caption": caption, "java": j, "python": p}
                   for i, (caption, j, p) in enumerate(zip(captions, java, python, strict=True)) if j != p]
    identical = len(captions) - len(differences)
    return {"captions": len(captions), "identical": identical, "agreement": identical / max(len(captions), 1),
            "differences": differences, "seconds": seconds}


def main() -> None:
    args = parse_args()
    captions = [a["caption"] for a in json.loads(args.annotations.read_text())["annotations"]]
    java, java_seconds = timed(ptb_tokenize, captions)  # includes starting the JVM, as in evaluation
    ptb_tokenize_python("warm up")  # builds the scanner's regexes once (about 0.1 s)
    batch = compare(captions, java, *timed(ptb_tokenize_python_batch, captions))
    per_caption = compare(captions, java, *timed(
        lambda texts: [" ".join(ptb_tokenize_python(t)) for t in texts], captions))

    console = Console()
    table = Table(title=f"PTB tokenization of {len(captions)} captions ({args.annotations.name})")
    for column in ("tokenizer", "captions", "identical to Java", "rate", "seconds"):
        table.add_column(column, justify="left" if column == "tokenizer" else "right")
    table.add_row("Java (one ptb_tokenize call)", str(len(captions)), "-", "-", f"{java_seconds:.2f}")
    for name, result in (("Python, batch", batch), ("Python, per caption", per_caption)):
        table.add_row(name, str(result["captions"]), str(result["identical"]),
                      f"{result['agreement']:.4%}", f"{result['seconds']:.2f}")
    console.print(table)
    for name, result in (("batch", batch), ("per caption", per_caption)):
        for difference in result["differences"][:SHOWN_DIFFERENCES]:
            console.print(f"[bold]{name} #{difference['index']}[/bold] {escape(repr(difference['caption']))}\n"
                          f"  java:   {escape(repr(difference['java']))}\n"
                          f"  python: {escape(repr(difference['python']))}", highlight=False)
    if per_caption["differences"]:
        console.print(escape("Per-caption differences come from Java's trailing context reaching into the next "
                             "caption; ptb_tokenize([caption]) alone agrees with ptb_tokenize_python(caption)."))

    if args.json:
        args.json.write_text(json.dumps({
            "annotations": str(args.annotations), "captions": batch["captions"], "identical": batch["identical"],
            "agreement": batch["agreement"], "differences": batch["differences"],
            "java_seconds": java_seconds, "python_seconds": batch["seconds"],
            "per_caption": {k: per_caption[k] for k in ("identical", "agreement", "differences", "seconds")},
        }, indent=2, ensure_ascii=False))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
