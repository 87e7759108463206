"""Score an official COCO results file against COCO caption annotations.

    captioning evaluate RESULTS.json --annotations captions_val2017.json \
        [--output METRICS.json] [--per-image PER_IMAGE.json] [--leave-one-out]

(``python -m captioning.evaluation`` runs the same.)

Results are ``[{"image_id": int, "caption": str}, ...]`` with one caption per image; every image
id must be in the annotations. Only the images in the results are scored (as ``COCOEvalCap`` does).

``--leave-one-out`` also prints a fair human comparison: in five rounds each human reference is
scored against the image's other references, and the model's caption against exactly the same
references (``CocoCaptionEvaluator.leave_one_out``); ``--output`` then also holds
``human_loo/<metric>`` and ``model_loo/<metric>``. Compare the human numbers with the model's
leave-one-out numbers, not with its ordinary scores: those use one reference more.
Exit status: 0 scored, 2 bad input (the message names the file and the entry), a
``CAPTIONING_JAVA`` that is no java, or an output that cannot be written (found before scoring).
Errors go to stderr as plain text: a file name such as ``r[x].json`` is printed as it is.
"""

import argparse
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from captioning.data.datasets import load_coco_references, read_json_file
from captioning.cli_args import EXIT_STATUS_HELP
from captioning.data.files import check_writable, write_json, writing_alone
from captioning.errors import InputError
from captioning.evaluation.coco import CocoCaptionEvaluator
from captioning.evaluation.java import find_java
from captioning.progress import progress_bar


def load_results(path: Path) -> dict[int, str]:
    """``{image_id: caption}`` from a COCO results file, refusing malformed or duplicate entries."""
    entries = read_json_file(path, "results file")
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a JSON list of {{\"image_id\": int, \"caption\": str}}, "
                         f"got a {type(entries).__name__}")
    captions: dict[int, str] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise InputError(f"{where} must be an object with \"image_id\" and \"caption\", got {entry!r:.200}")
        image_id, caption = entry["image_id"], entry["caption"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(f"{where}: image_id must be an integer, got {image_id!r}")
        if not isinstance(caption, str):
            raise InputError(f"{where}: caption must be a string, got {caption!r:.200}")
        if image_id in captions:
            raise InputError(f"{where}: image_id {image_id} appears twice; give one caption per image")
        captions[image_id] = caption
    if not captions:
        raise InputError(f"{path} holds no results")
    return captions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="captioning evaluate",
                                     description="Score a COCO results file (BLEU, METEOR, ROUGE_L, CIDEr, "
                                                 "SPICE where it can run) against caption annotations.",
                                     epilog=EXIT_STATUS_HELP)
    parser.add_argument("results", type=Path, help='[{"image_id": int, "caption": str}, ...]')
    parser.add_argument("--annotations", type=Path, required=True, help="COCO captions_*.json")
    parser.add_argument("--output", type=Path, help="write the metrics here as JSON (checked before scoring; "
                                                    "replaced whole, never left half-written)")
    parser.add_argument("--per-image", type=Path, help="write every image's scores here as JSON (as --output)")
    parser.add_argument("--no-spice", action="store_true", help="do not run SPICE even where it could run")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also score humans against the model fairly: in rounds 1..5 each image's i-th "
                             "reference and the model's caption are both scored against all the image's other "
                             "references (images with fewer than 5 references are left out); prints the "
                             "two side by side and adds human_loo/<metric> and model_loo/<metric> to --output")
    args = parser.parse_args(argv)
    if args.output is not None and args.output == args.per_image:
        parser.error("--output and --per-image must be different files")
    return args


def report_error(message: object) -> None:
    """One error line on stderr, as the other commands print theirs: plain text, never read as rich markup
    (a file named ``r[x].json`` would lose its ``[x]``, and ``a[/x].json`` would raise)."""
    print(f"captioning evaluate: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The ``evaluate`` command; its outputs are checked and held (no second writer) before anything is read."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    args = parse_args(argv)
    with ExitStack() as claimed:
        try:
            for flag, path in (("--output", args.output), ("--per-image", args.per_image)):
                if path is not None:
                    check_writable(path, flag)
                    claimed.enter_context(writing_alone(path, flag))
        except InputError as error:
            report_error(error)
            return 2
        try:
            find_java()  # a CAPTIONING_JAVA that is no java: said now, before minutes of reading and tokenizing
        except RuntimeError as error:
            report_error(error)
            return 2
        return evaluate(args, Console())


def evaluate(args: argparse.Namespace, console: Console) -> int:
    """Score ``args.results``, print the tables and write the outputs; 2 for input that cannot be scored."""
    try:
        captions = load_results(args.results)
        references = load_coco_references(args.annotations)
        unknown = sorted(set(captions) - set(references))
        if unknown:
            raise InputError(f"{args.results}: {len(unknown)} image ids are not in {args.annotations}, "
                             f"e.g. {unknown[:5]}")
    except (InputError, FileNotFoundError) as error:
        report_error(error)
        return 2
    try:  # references with no word (found once tokenized) cannot be scored
        with progress_bar(True) as bar:  # each phase takes minutes on a full COCO split
            phase = bar.add_task(f"tokenizing {sum(map(len, references.values()))} references",
                                 total=3 if args.leave_one_out else 2)
            with CocoCaptionEvaluator(references, spice=not args.no_spice) as evaluator:
                evaluator.tokenized_references()
                bar.update(phase, advance=1, description=f"scoring {len(captions)} captions")
                result = evaluator.score(captions)
                loo = None
                if args.leave_one_out:
                    bar.update(phase, advance=1, description="scoring leave-one-out (5 rounds)")
                    loo = evaluator.leave_one_out(captions)
                bar.update(phase, advance=1, description="scored")
    except InputError as error:
        report_error(f"{args.annotations}: {error}")
        return 2
    if args.leave_one_out and loo is None:
        report_error(f"--leave-one-out needs images with at least 5 references; none of the {len(captions)} "
                     f"scored images in {args.annotations} has that many")
        return 2
    table = Table(title=Text(f"{len(captions)} captions scored against {args.annotations.name}"))  # no markup
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    metrics = dict(result.metrics)
    if loo is not None:
        table = Table(title=f"leave-one-out over {loo.images} images, {loo.rounds} rounds: "
                            "human and model against the same references")
        for column in ("metric", "human", "model"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name in loo.human:
            table.add_row(name, f"{loo.human[name]:.4f}", f"{loo.model[name]:.4f}")
        console.print(table)
        metrics |= {f"human_loo/{name}": value for name, value in loo.human.items()}
        metrics |= {f"model_loo/{name}": value for name, value in loo.model.items()}
    if args.output:
        write_json(args.output, metrics)
    if args.per_image:
        write_json(args.per_image, {str(i): scores for i, scores in result.per_image.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
