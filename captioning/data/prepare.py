"""Check a caption dataset before training; write its vocabulary, a report and a resized-image cache.

    python -m captioning.data.prepare --format coco --annotations captions_train2017.json \
        --images train2017 [--output prepared/ [--image-cache --image-size 256]] [--check-only]

Real datasets hold missing, truncated and non-RGB images, empty captions and files in the wrong
encoding; finding them here takes minutes, finding them mid-training costs the run. Every image is
decoded once (through ``open_rgb``, as training does) and every caption tokenized once (as
training does). Problems are printed with their file names (the first ``--show`` of each kind) and
all of them go to ``report.json`` under ``--output``; nothing is dropped silently. With
``--output`` the vocabulary (``vocab.json``) is written too, and with ``--image-cache`` the
resized-image cache (``image_cache/``, see ``captioning.data.image_cache``). Rerunning rewrites
nothing that is already up to date.

Exit status: 0 no errors (images converted to RGB are counted, not errors), 1 errors (missing,
unreadable or too large images, empty captions, repeated image ids), 2 bad arguments or an
annotation file that cannot be read.
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

from captioning.data.datasets import FORMATS, CaptionedImage, load_annotations
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
REPORT_NAME, VOCAB_NAME, CACHE_DIR = "report.json", "vocab.json", "image_cache"


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m captioning.data.prepare",
                                     description="Check a caption dataset; write its vocabulary, a report and "
                                                 "a resized-image cache.")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="coco: COCO captions JSON; karpathy: dataset_*.json with splits; folder: JSONL/CSV "
                             "rows (file, caption[, split]); images: a folder of images, no captions")
    parser.add_argument("--annotations", type=Path, help="the annotation file (every format but images)")
    parser.add_argument("--images", type=Path, required=True, help="the image folder (Karpathy: its root)")
    parser.add_argument("--split", action="extend", nargs="+", metavar="SPLIT",
                        help="karpathy/folder: only these splits (default: all); the vocabulary comes from "
                             "them, so pass the training split(s) for the training vocabulary")
    parser.add_argument("--output", type=Path, help="write report.json, vocab.json (and image_cache/) here")
    parser.add_argument("--check-only", action="store_true", help="check and print; write nothing")
    parser.add_argument("--image-cache", action="store_true", help="write the resized-image cache under --output")
    parser.add_argument("--image-size", type=int, default=256, help="side of the cached square images")
    parser.add_argument("--min-word-count", type=int, default=5, help="vocabulary: words seen fewer times are <unk>")
    parser.add_argument("--max-caption-length", type=int, default=16, help="words kept per caption in training")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding images (0: this one)")
    parser.add_argument("--show", type=int, default=20, help="problems printed per kind (all go to report.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.format == "images" and args.annotations is not None:
        parser.error("--format images takes no --annotations (it lists the image folder)")
    if args.format != "images" and args.annotations is None:
        parser.error(f"--format {args.format} needs --annotations")
    if args.split and args.format not in ("karpathy", "folder"):
        parser.error("--split applies to --format karpathy and folder (a COCO file is one split)")
    if args.image_cache and args.output is None:
        parser.error("--image-cache needs --output (the cache is written under it)")
    for name in ("image_size", "min_word_count", "max_caption_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.show < 0:
        parser.error("--workers and --show cannot be negative")
    return args


def load_dataset(args: argparse.Namespace) -> list[CaptionedImage]:
    """The dataset's images and captions, or ``InputError`` naming the file that cannot be read."""
    if not args.images.is_dir():
        raise InputError(f"image folder {args.images} does not exist or is not a folder")
    source = args.annotations or args.images
    try:
        return load_annotations(args.format, args.annotations, args.images, args.split)
    except UnicodeDecodeError as error:
        raise InputError(f"{source} is not UTF-8 text: {error}") from None
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{source}: {error}" if str(source) not in str(error) else str(error)) from None


def build_report(args: argparse.Namespace, images: list[CaptionedImage], writing: bool) -> DatasetReport:
    """Check captions and images (decoding through the cache when one is written) into a report."""
    progress = not args.no_progress
    findings, tokens = check_captions(images, expect_captions=args.format != "images")
    report = DatasetReport(
        dataset={"format": args.format, "annotations": str(args.annotations) if args.annotations else None,
                 "images": str(args.images), "splits": args.split},
        images=len(images), captions=len(tokens), findings=findings)
    if writing and args.image_cache:
        unique = list(_first_of_each_id(images).values())
        cache = write_image_cache(unique, args.output / CACHE_DIR, args.image_size, progress=progress,
                                  workers=args.workers)
        bad, report.conversions = findings_from_cache(cache, unique)
        report.image_cache = {"directory": str(cache.directory.relative_to(args.output)), "key": cache.key,
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
    source = report.dataset["annotations"] or report.dataset["images"]
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
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
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
        images = load_dataset(args)
        if writing:
            args.output.mkdir(parents=True, exist_ok=True)
        report = build_report(args, images, writing)
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
