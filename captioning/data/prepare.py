"""Check a caption dataset before training; write its vocabulary, a report and the resized-image cache.

    captioning prepare --format coco --annotations annotations/captions_train2017.json --images train2017 \
        --annotations annotations/captions_val2017.json --images val2017 \
        [--output prepared/] [--image-cache [DIR] --image-size 224] [--check-only]

(``python -m captioning.data.prepare`` runs the same.) ``--annotations``/``--images`` pairs may be
repeated: one check, one vocabulary and one image cache over all of them.

Real datasets hold missing, truncated and non-RGB images, empty captions and files in the wrong
encoding; finding them here takes minutes, finding them mid-training costs the run. Every image is
decoded once (through ``open_rgb``, as training does) and every caption tokenized once (as
training does). Problems are printed with their file names (the first ``--show`` of each kind) and
all of them go to ``report.json`` under ``--output``; nothing is dropped silently. With
``--output`` the vocabulary (``vocab.json``) is written too. ``--image-cache`` writes the
resized-image cache (``captioning.data.image_cache``) into the folder training reads with
``data.image_cache=true``: by default the same folder as training's default ``data.image_cache_dir``
(``paths.cache_dir``/images, ``CAPTIONING_CACHE_DIR``), at ``--image-size`` (training's
``data.image_size``, 224 in the dataset configs). Training opens a cache of its images or of more
(all splits prepared at once) and decodes nothing again. Rerunning rewrites nothing that is
already up to date; output locations are checked before any image is read.

Exit status: 0 no errors (images converted to RGB are counted, not errors), 1 errors (missing,
unreadable or too large images, empty captions, repeated image ids), 2 bad arguments, an
annotation file that cannot be read or an output that cannot be written.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from captioning.cli_args import EXIT_STATUS_HELP, int_at_least, non_negative_int, positive_int
from captioning.config import LOWEST
from captioning.data.datasets import FORMATS, CaptionedImage, load_annotations
from captioning.data.files import check_writable, write_text
from captioning.data.image_cache import ImageCacheReport, image_mapper, write_image_cache
from captioning.data.images import BadImageError, open_rgb
from captioning.data.tokenize import tokenize
from captioning.data.vocab import Vocabulary
from captioning.errors import InputError
from captioning.progress import progress_bar

log = logging.getLogger(__name__)

# kind -> what it means; errors make the exit status 1, warnings are listed and counted only
ERRORS = {
    "missing": "missing images",
    "unreadable": "unreadable images",
    "too_large": "images too large (decompression-bomb guard)",
    "empty_caption": "empty or whitespace-only captions",
    "duplicate_image_id": "repeated image ids",
}
WARNINGS = {
    "punctuation_caption": "captions of punctuation only (no word)",
    "no_captions": "images without captions",
}
CONVERSIONS = {  # images made RGB by open_rgb, as training will: counted, not errors
    "grayscale": "grayscale",
    "CMYK": "CMYK",
    "RGBA": "with alpha (composited on white)",
    "palette": "palette",
    "16-bit": "16-bit (scaled to 8 bits)",
    "32-bit": "32-bit integer or float (scaled to 8 bits)",
    "other": "other modes",
}
REPORT_NAME, VOCAB_NAME = "report.json", "vocab.json"
# the dataset configs' data.image_size: a cache at another size is not the one training opens
TRAINING_IMAGE_SIZE = 224
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder of train.py in a checkout


@dataclass(frozen=True)
class Finding:
    """One problem (or conversion) and where: the image file it concerns and the details."""

    kind: str
    file: str
    image_id: int
    detail: str


@dataclass
class DatasetReport:
    """Everything the check found; ``to_json`` is what ``report.json`` holds."""

    dataset: dict[str, Any]
    images: int
    captions: int
    findings: list[Finding] = field(default_factory=list)
    conversions: list[Finding] = field(default_factory=list)
    vocabulary: dict[str, Any] | None = None
    image_cache: dict[str, Any] | None = None

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings + self.conversions if f.kind == kind]

    @property
    def error_count(self) -> int:
        return sum(f.kind in ERRORS for f in self.findings)

    @property
    def exit_status(self) -> int:
        return 1 if self.error_count else 0

    def counts(self) -> dict[str, Any]:
        missing = len(self.of_kind("missing"))
        bad = missing + len(self.of_kind("unreadable")) + len(self.of_kind("too_large"))
        return {
            "images": self.images, "found": self.images - missing, "usable": self.images - bad,
            "missing": missing, "unreadable": len(self.of_kind("unreadable")),
            "too_large": len(self.of_kind("too_large")),
            "converted": {kind: n for kind in CONVERSIONS if (n := len(self.of_kind(kind)))},
            "captions": self.captions, "empty_captions": len(self.of_kind("empty_caption")),
            "punctuation_only_captions": len(self.of_kind("punctuation_caption")),
            "duplicate_image_ids": len(self.of_kind("duplicate_image_id")),
            "images_without_captions": len(self.of_kind("no_captions")),
        }

    def to_json(self) -> dict[str, Any]:
        def listing(kinds: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
            return {kind: [asdict(f) for f in found] for kind in kinds if (found := self.of_kind(kind))}

        return {"dataset": self.dataset, "counts": self.counts(), "errors": listing(ERRORS),
                "warnings": listing(WARNINGS), "conversions": listing(CONVERSIONS),
                "vocabulary": self.vocabulary, "image_cache": self.image_cache, "exit_status": self.exit_status}


def conversion_kind(conversion: str) -> str:
    """``"L->RGB"`` -> ``"grayscale"``: the source mode's family, as the report groups them."""
    mode = conversion.split("->", 1)[0]
    if mode in ("1", "L", "LA", "La"):
        return "grayscale"
    if mode in ("RGBA", "RGBa"):
        return "RGBA"
    if mode in ("P", "PA"):
        return "palette"
    if mode.startswith("I;16"):
        return "16-bit"
    if mode in ("I", "F"):
        return "32-bit"
    return "CMYK" if mode == "CMYK" else "other"


def _conversion_finding(image: CaptionedImage, conversion: str) -> Finding:
    return Finding(conversion_kind(conversion), str(image.path), image.image_id, conversion)


def check_captions(images: Sequence[CaptionedImage], expect_captions: bool) -> tuple[list[Finding], list[list[str]]]:
    """Caption and id problems, and every caption's tokens (for the vocabulary)."""
    findings, tokens, seen = [], [], set()
    for image in images:
        if image.image_id in seen:
            findings.append(Finding("duplicate_image_id", str(image.path), image.image_id,
                                    f"image id {image.image_id} appears more than once"))
        seen.add(image.image_id)
        if expect_captions and not image.captions:
            findings.append(Finding("no_captions", str(image.path), image.image_id, "no caption refers to it"))
        for number, caption in enumerate(image.captions, start=1):
            words = tokenize(caption)
            tokens.append(words)
            if not caption.strip():
                findings.append(Finding("empty_caption", str(image.path), image.image_id,
                                        f"caption {number} of image {image.image_id} is {caption!r}"))
            elif not words:
                findings.append(Finding("punctuation_caption", str(image.path), image.image_id,
                                        f"caption {number} of image {image.image_id} is {caption!r}"))
    return findings, tokens


def _first_of_each_id(images: Sequence[CaptionedImage]) -> dict[int, CaptionedImage]:
    """One image per id (a repeated id is reported as an error; its first image is the one checked)."""
    unique: dict[int, CaptionedImage] = {}
    for image in images:
        unique.setdefault(image.image_id, image)
    return unique


def _probe(job: tuple[int, str]) -> tuple[int, str | None, tuple[str, str] | None]:
    """Decode one image as training will; failures come back as data (they cross processes)."""
    image_id, path = job
    try:
        return image_id, open_rgb(path)[1].conversion, None
    except BadImageError as error:
        return image_id, None, (error.reason, error.detail)


def check_images(images: Sequence[CaptionedImage], progress: bool = True,
                 workers: int = 0) -> tuple[list[Finding], list[Finding]]:
    """(bad images, conversions) from decoding every image once; truncation only shows when decoding."""
    by_id = _first_of_each_id(images)
    bad, conversions = [], []
    with progress_bar(progress) as bar, image_mapper(workers) as mapper:
        task = bar.add_task("checking images", total=len(images))
        for image_id, conversion, failure in mapper(_probe, ((i.image_id, str(i.path)) for i in by_id.values())):
            image = by_id[image_id]
            if failure is not None:
                bad.append(Finding(failure[0], str(image.path), image_id, failure[1]))
            elif conversion is not None:
                conversions.append(_conversion_finding(image, conversion))
            bar.advance(task)
    return bad, conversions


def findings_from_cache(report: ImageCacheReport,
                        images: Sequence[CaptionedImage]) -> tuple[list[Finding], list[Finding]]:
    """The same (bad images, conversions) as ``check_images``, from the cache that decoded them."""
    by_id = {image.image_id: image for image in images}
    bad = [Finding(b.reason, b.path, b.image_id, b.detail) for b in report.bad]
    conversions = [_conversion_finding(by_id[i], c) for i, c in sorted(report.conversions.items())]
    return bad, conversions


def vocabulary_summary(vocab: Vocabulary, tokens: list[list[str]], min_count: int, max_length: int) -> dict[str, Any]:
    lengths = [len(words) for words in tokens]
    return {"size": len(vocab), "min_count": min_count, "max_caption_length": max_length,
            "words": sum(lengths), "unknown_rate": round(vocab.unknown_rate(tokens), 6),
            "longest_caption": max(lengths, default=0),
            "captions_truncated": sum(n > max_length for n in lengths)}


# ---------------------------------------------------------------- CLI


def default_image_cache_dir() -> Path:
    """Training's default ``data.image_cache_dir``, resolved as conf/paths/default.yaml and train.py do.

    ``${paths.cache_dir}/images``, where ``paths.cache_dir`` is ``CAPTIONING_CACHE_DIR`` or
    ``${paths.root_dir}/cache`` and ``paths.root_dir`` is ``CAPTIONING_ROOT`` or train.py's folder.
    """
    root = Path(os.environ.get("CAPTIONING_ROOT") or PROJECT_ROOT)
    return Path(os.environ.get("CAPTIONING_CACHE_DIR") or root / "cache") / "images"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="captioning prepare", epilog=EXIT_STATUS_HELP,
                                     description="Check a caption dataset; write its vocabulary, a report and "
                                                 "the resized-image cache training reads.")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="coco: COCO captions JSON; karpathy: dataset_*.json with splits; folder: JSONL/CSV "
                             "rows (file, caption[, split]); images: a folder of images, no captions")
    parser.add_argument("--annotations", type=Path, action="append",
                        help="the annotation file (every format but images); repeat it with --images for "
                             "several parts, e.g. COCO's train and val files")
    parser.add_argument("--images", type=Path, action="append", required=True,
                        help="the image folder of the --annotations before it (Karpathy: the dataset root)")
    parser.add_argument("--split", action="extend", nargs="+", metavar="SPLIT",
                        help="karpathy/folder: only these splits (default: all); the vocabulary comes from "
                             "them, so pass the training split(s) for the training vocabulary")
    parser.add_argument("--output", type=Path, help="write report.json and vocab.json into this folder")
    parser.add_argument("--check-only", action="store_true", help="check and print; write nothing")
    parser.add_argument("--image-cache", type=Path, nargs="?", const=default_image_cache_dir(), metavar="DIR",
                        help="write the resized-image cache into DIR, where training with data.image_cache=true "
                             f"finds it (default: training's data.image_cache_dir, now {default_image_cache_dir()}"
                             "; for another DIR train with data.image_cache_dir=DIR)")
    parser.add_argument("--image-size", type=int_at_least(int(LOWEST["data.image_size"])),
                        default=TRAINING_IMAGE_SIZE,
                        help="side of the cached square images: training's data.image_size, or training "
                             f"makes its own cache (default {TRAINING_IMAGE_SIZE}, as the dataset configs)")
    parser.add_argument("--min-word-count", type=positive_int, default=5,
                        help="vocabulary: words seen fewer times are <unk>")
    parser.add_argument("--max-caption-length", type=positive_int, default=16,
                        help="words kept per caption in training")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="processes decoding images (0: this one)")
    parser.add_argument("--show", type=non_negative_int, default=20,
                        help="problems printed per kind (all go to report.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    annotations = args.annotations or []
    if args.format == "images" and annotations:
        parser.error("--format images takes no --annotations (it lists the image folder)")
    if args.format != "images" and len(annotations) != len(args.images):
        parser.error(f"--format {args.format} needs one --annotations per --images, got {len(annotations)} and "
                     f"{len(args.images)}")
    if args.split and args.format not in ("karpathy", "folder"):
        parser.error("--split applies to --format karpathy and folder (a COCO file is one split)")
    if args.check_only and args.image_cache is not None:
        parser.error("--check-only writes nothing, so it cannot write --image-cache: drop one of them")
    return args


def load_dataset(args: argparse.Namespace) -> list[CaptionedImage]:
    """The images and captions of every (annotations, images) part, or ``InputError`` naming the file."""
    pairs = zip(args.annotations, args.images) if args.annotations else ((None, images) for images in args.images)
    return [image for annotations, images in pairs for image in _load_part(args, annotations, images)]


def _load_part(args: argparse.Namespace, annotations: Path | None, images: Path) -> list[CaptionedImage]:
    if not images.is_dir():
        raise InputError(f"image folder {images} does not exist or is not a folder")
    source = annotations or images
    try:
        return load_annotations(args.format, annotations, images, args.split)
    except UnicodeDecodeError as error:
        raise InputError(f"{source} is not UTF-8 text: {error}") from None
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{source}: {error}" if str(source) not in str(error) else str(error)) from None


def build_report(args: argparse.Namespace, images: list[CaptionedImage]) -> DatasetReport:
    """Check captions and images (decoding through the cache when one is written) into a report."""
    progress = not args.no_progress
    findings, tokens = check_captions(images, expect_captions=args.format != "images")
    report = DatasetReport(
        dataset={"format": args.format, "annotations": [str(a) for a in args.annotations or []] or None,
                 "images": [str(i) for i in args.images], "splits": args.split},
        images=len(images), captions=len(tokens), findings=findings)
    if args.image_cache is not None:
        unique = list(_first_of_each_id(images).values())
        cache = write_image_cache(unique, args.image_cache, args.image_size, progress=progress, workers=args.workers)
        bad, report.conversions = findings_from_cache(cache, unique)
        report.image_cache = {"directory": str(cache.directory.absolute()), "key": cache.key,
                              "image_size": cache.image_size, "cached": cache.cached, "bad": len(cache.bad)}
    else:
        bad, report.conversions = check_images(images, progress, args.workers)
    report.findings = bad + report.findings
    if tokens:
        vocab = Vocabulary.build(tokens, args.min_word_count)
        report.vocabulary = vocabulary_summary(vocab, tokens, args.min_word_count, args.max_caption_length)
        report.vocabulary["tokens"] = vocab.tokens  # taken out again for report.json
    return report


def print_report(console: Console, report: DatasetReport, show: int, full_listing: bool) -> None:
    """A summary table, then the first ``show`` findings of each kind with their files."""
    counts = report.counts()
    source = ", ".join(report.dataset["annotations"] or report.dataset["images"])
    table = Table(title=f"{report.dataset['format']} dataset: {source}")
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_column("status")
    table.add_row("images listed", str(counts["images"]), "")
    table.add_row("images found", str(counts["found"]), "")
    for kind, label in ERRORS.items():
        found = len(report.of_kind(kind))
        table.add_row(label, str(found), "[red]error[/red]" if found else "ok")
    for kind, label in CONVERSIONS.items():
        if found := len(report.of_kind(kind)):
            table.add_row(f"converted to RGB: {label}", str(found), "counted")
    table.add_row("captions", str(counts["captions"]), "")
    for kind, label in WARNINGS.items():
        found = len(report.of_kind(kind))
        table.add_row(label, str(found), "[yellow]warning[/yellow]" if found else "ok")
    if report.vocabulary:
        v = report.vocabulary
        table.add_row(f"vocabulary (min count {v['min_count']})", str(v["size"]), f"unknown {v['unknown_rate']:.2%}")
        table.add_row(f"captions over {v['max_caption_length']} words (truncated)", str(v["captions_truncated"]), "")
    console.print(table)
    for kinds, severity in ((ERRORS, "error"), (WARNINGS, "warning"), (CONVERSIONS, "converted to RGB")):
        for kind, label in kinds.items():
            found = report.of_kind(kind)
            if not found:
                continue
            console.print(f"{severity} {kind} ({len(found)}): {label}", markup=False, highlight=False)
            for finding in found[:show]:
                console.print(f"  {kind}: {finding.file} (image {finding.image_id}): {finding.detail}",
                              markup=False, highlight=False, soft_wrap=True)
            if len(found) > show:
                where = f"all in {REPORT_NAME}" if full_listing else f"--output lists all in {REPORT_NAME}"
                console.print(f"  ... and {len(found) - show} more ({where})", markup=False, highlight=False)
    verdict = (f"{report.error_count} error(s)" if report.error_count else "no errors")
    console.print(f"{verdict}; exit status {report.exit_status}", markup=False, highlight=False)


def _write_if_changed(path: Path, text: str) -> bool:
    """Atomic, and untouched when already up to date (a rerun changes no file); True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)
    return True


def write_outputs(output: Path, report: DatasetReport) -> list[str]:
    """``vocab.json`` (tokens in id order, with the settings they came from) and ``report.json``.

    Returns the names of the files that changed.
    """
    document = report.to_json()
    vocabulary = dict(report.vocabulary or {})
    tokens = vocabulary.pop("tokens", None)
    document["vocabulary"] = vocabulary or None
    texts = {REPORT_NAME: json.dumps(document, indent=1, ensure_ascii=False) + "\n"}
    if tokens is not None:
        texts[VOCAB_NAME] = json.dumps({"tokens": tokens, "min_count": vocabulary["min_count"],
                                        "max_caption_length": vocabulary["max_caption_length"]},
                                       indent=1, ensure_ascii=False) + "\n"
    return [name for name, text in texts.items() if _write_if_changed(output / name, text)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; the exit status says whether the dataset is fit for training (see the module doc)."""
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse: 2 for bad arguments, 0 for --help
        return stop.code if isinstance(stop.code, int) else 2
    errors = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=errors, show_path=False)])
    writing = args.output is not None and not args.check_only
    if args.check_only and args.output is not None:
        log.info("--check-only: nothing is written to %s", args.output)
    try:
        if writing:
            check_writable(args.output, "--output", folder=True)
        if args.image_cache is not None:
            check_writable(args.image_cache, "--image-cache", folder=True)
        images = load_dataset(args)
        report = build_report(args, images)
    except (InputError, OSError) as error:
        errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return 2
    print_report(Console(), report, args.show, full_listing=writing)
    if writing:
        changed = write_outputs(args.output, report)
        log.info("%s in %s", f"wrote {' and '.join(changed)}" if changed else "outputs already up to date",
                 args.output)
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
