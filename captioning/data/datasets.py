"""Caption datasets: loaders for every format (COCO, Karpathy split, your own folder, images only)
and the torch ``Dataset`` every split goes through."""

import csv
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from captioning.data.images import BadImageError
from captioning.errors import InputError, check_choice

log = logging.getLogger(__name__)


class AnnotationError(InputError):
    """A caption file (annotations, split file, caption table, results) is malformed; the message names the
    file and the field."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the data settings name does not exist (a ``FileNotFoundError`` callers may catch as
    such, and an ``InputError`` the commands report in plain words)."""


@dataclass(frozen=True)
class CaptionedImage:
    """One image and its reference captions (raw text, as annotated)."""

    image_id: int
    path: Path
    captions: tuple[str, ...]


@dataclass(frozen=True)
class DatasetItem:
    """What a dataset yields for one image: pixels (or its cached encoder features) and its encoded captions."""

    image_id: int
    image: torch.Tensor  # (3, H, W) pixels, or (1 + k*k, encoder_dim) cached features
    captions: list[torch.Tensor]  # each (caption_length + 2,): <bos> words <eos>


FORMATS = ("coco", "karpathy", "folder", "images")
SPLITS = ("train", "val", "test")  # the splits a run trains, validates and tests on
CAPTIONS_PER_IMAGE = ("all", "random", "pairs")  # CaptionDataset's modes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_SPLIT_RATIOS = {"train": 0.9, "val": 0.05, "test": 0.05}


def load_annotations(format: str, annotations: str | os.PathLike | None, images: str | os.PathLike,
                     splits: Sequence[str] | None = None, split_ratios: Mapping[str, float] | None = None,
                     seed: int = 0, known_splits: Sequence[str] | None = None) -> list[CaptionedImage]:
    """Images and raw captions of a dataset in any supported format, ordered by image id.

    ``splits`` selects the Karpathy splits (train / restval / val / test) or the folder table's
    splits to keep (None: all). ``split_ratios`` and ``seed`` assign a folder table's rows that have
    no split column; ``known_splits`` (every split the run uses) makes a table row naming another
    split an error instead of an image silently left out.
    """
    if format == "coco":
        return load_coco_captions(_needs(annotations, format), images)
    if format == "karpathy":
        return load_karpathy_split(_needs(annotations, format), images, splits)
    if format == "folder":
        return load_caption_table(_needs(annotations, format), images, splits, split_ratios, seed, known_splits)
    if format == "images":
        return load_image_folder(images)
    raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}")


def _needs(annotations: str | os.PathLike | None, format: str) -> Path:
    if annotations is None:
        raise ValueError(f"the {format!r} format needs an annotation file")
    return Path(annotations)


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON of a file a user gave (``what`` names its role in the messages, e.g. "annotation file").

    A missing file is a ``MissingInputError`` (a ``FileNotFoundError``), text that is not UTF-8 or not JSON an
    ``AnnotationError``; both messages name the file.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MissingInputError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path} is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path} is not valid JSON: {error}") from None


def load_coco_references(annotation_file: str | os.PathLike) -> dict[int, list[str]]:
    """``{image_id: [captions]}`` of a COCO caption file, what the evaluator scores against.

    Only ``annotations`` is read (image ids in order of first appearance, captions in file order),
    so a file without ``images`` serves too; images without a caption are not listed.
    """
    annotation_file = Path(annotation_file)
    return _coco_annotations(read_json_file(annotation_file, "annotation file"), annotation_file)


def load_coco_captions(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> list[CaptionedImage]:
    """Read a COCO caption file (``{"images": [...], "annotations": [...]}``), ordered by image id."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    data = read_json_file(annotation_file, "annotation file")
    if not isinstance(data, dict):
        raise AnnotationError(f"{annotation_file}: expected a JSON object with 'images' and 'annotations'")
    images = _require(data, "images", list, annotation_file, "the top-level object")

    files: dict[int, Path] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        image_id = _require(image, "id", int, annotation_file, where)
        if image_id in files:
            raise AnnotationError(f"{annotation_file}: {where} repeats image id {image_id}")
        files[image_id] = _inside(image_dir, [_require(image, "file_name", str, annotation_file, where)],
                                  annotation_file, where, "file_name")

    captions = _coco_annotations(data, annotation_file, files)
    return [CaptionedImage(image_id, files[image_id], tuple(captions.get(image_id, ())))
            for image_id in sorted(files)]


def _coco_annotations(data: Any, annotation_file: Path, image_ids: Container[int] | None = None
                      ) -> dict[int, list[str]]:
    """The ``annotations`` of COCO caption JSON as ``{image_id: [captions]}``, checked entry by entry;
    with ``image_ids``, an annotation of any other image is an error."""
    annotations = _require(data, "annotations", list, annotation_file, "the top-level object")
    captions: dict[int, list[str]] = {}
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        image_id = _require(annotation, "image_id", int, annotation_file, where)
        caption = _require(annotation, "caption", str, annotation_file, where)
        if image_ids is not None and image_id not in image_ids:
            raise AnnotationError(f"{annotation_file}: {where} refers to image id {image_id}, "
                                  "which is not in 'images'")
        captions.setdefault(image_id, []).append(caption)
    return captions


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_karpathy_split(dataset_file: str | os.PathLike, image_root: str | os.PathLike,
                        splits: Sequence[str] | None = None) -> list[CaptionedImage]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr8k.json``, ...).

    Image ids are ``cocoid`` when present (so COCO's own ids and annotations match), else ``imgid``;
    paths are ``image_root / filepath / filename`` (Flickr files have no ``filepath``); captions are
    the ``raw`` sentences. An image whose ``split`` is none of ``KARPATHY_SPLITS`` (a typo such as
    "tarin") is an ``AnnotationError`` naming it: leaving it out would shrink a split without a word.
    """
    dataset_file, image_root = Path(dataset_file), Path(image_root)
    unknown = sorted(set(splits or ()) - set(KARPATHY_SPLITS))
    if unknown:
        raise ValueError(f"unknown Karpathy splits {unknown}; they are {KARPATHY_SPLITS}")
    data = read_json_file(dataset_file, "annotation file")
    images = _require(data, "images", list, dataset_file, "the top-level object")
    result: dict[int, CaptionedImage] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        split = _require(image, "split", str, dataset_file, where)
        if split not in KARPATHY_SPLITS:
            raise AnnotationError(f"{dataset_file}: {where} has split {split!r}, which is not a Karpathy split; "
                                  f"the splits are {list(KARPATHY_SPLITS)}")
        folder = _require(image, "filepath", str, dataset_file, where) if "filepath" in image else ""
        filename = _require(image, "filename", str, dataset_file, where)
        path = _inside(image_root, [folder, filename], dataset_file, where, "filepath/filename")
        if splits is not None and split not in splits:
            continue
        key = "cocoid" if isinstance(image, dict) and "cocoid" in image else "imgid"
        image_id = _require(image, key, int, dataset_file, where)
        if image_id in result:
            raise AnnotationError(f"{dataset_file}: {where} repeats {key} {image_id}")
        sentences = _require(image, "sentences", list, dataset_file, where)
        captions = tuple(_require(sentence, "raw", str, dataset_file, f"{where}.sentences[{j}]")
                         for j, sentence in enumerate(sentences))
        result[image_id] = CaptionedImage(image_id, path, captions)
    return [result[image_id] for image_id in sorted(result)]


def load_caption_table(table_file: str | os.PathLike, image_dir: str | os.PathLike,
                       splits: Sequence[str] | None = None, split_ratios: Mapping[str, float] | None = None,
                       seed: int = 0, known_splits: Sequence[str] | None = None) -> list[CaptionedImage]:
    """Your own data: ``(file, caption[, split])`` rows in a JSONL or CSV file, images in ``image_dir``.

    Rows of the same file are captions of one image. Image ids number the distinct files in sorted
    order (1, 2, ...). Files without a split column are assigned by a seeded hash of their name
    with ``split_ratios`` (default 90/5/5 train/val/test), so adding files never moves the others.
    A row whose split is not in ``known_splits`` (when given) is an ``AnnotationError`` listing them.
    """
    table_file, image_dir = Path(table_file), Path(image_dir)
    rows = _read_table(table_file)
    captions: dict[str, list[str]] = {}
    assigned: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for where, row in rows:
        name = _require(row, "file", str, table_file, where)
        if name not in paths:
            paths[name] = _inside(image_dir, [name], table_file, where, "file")
        caption = _require(row, "caption", str, table_file, where)
        captions.setdefault(name, []).append(caption)
        split = row.get("split") or None
        if split is not None:
            if known_splits is not None and split not in known_splits:
                raise AnnotationError(f"{table_file}: {where} puts {name} in split {split!r}, which no split of "
                                      f"this run uses; the splits are {sorted(known_splits)} (data.splits.*.subsets)")
            if assigned.get(name, split) != split:
                raise AnnotationError(f"{table_file}: {where} puts {name} in split {split!r}, "
                                      f"an earlier row in {assigned[name]!r}")
            assigned[name] = split
    ratios = dict(split_ratios or DEFAULT_SPLIT_RATIOS)
    result = []
    for image_id, name in enumerate(sorted(captions), start=1):
        split = assigned.get(name) or _hashed_split(name, ratios, seed)
        if splits is None or split in splits:
            result.append(CaptionedImage(image_id, paths[name], tuple(captions[name])))
    return result


def _read_table(table_file: Path) -> list[tuple[str, Any]]:
    """``(where, row)`` pairs of a JSONL file (one object per line) or a CSV file with a header."""
    try:
        text = table_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingInputError(f"caption table {table_file} does not exist") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{table_file} is not UTF-8 text: {error}") from None
    if table_file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"file", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise AnnotationError(f"{table_file}: the CSV header lacks the column(s) {sorted(missing)}")
        return [(f"row {number}", row) for number, row in enumerate(reader, start=2)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise AnnotationError(f"{table_file}: line {number} is not valid JSON: {error}") from None
    return rows


def _hashed_split(name: str, ratios: Mapping[str, float], seed: int) -> str:
    """A split for ``name`` drawn from ``ratios`` by a hash of (seed, name): stable across runs."""
    total = sum(ratios.values())
    if total <= 0:
        raise ValueError(f"split_ratios must be positive, got {dict(ratios)}")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2 ** 64 * total
    for split, ratio in ratios.items():
        point -= ratio
        if point < 0:
            return split
    return next(reversed(ratios))


def load_image_folder(image_dir: str | os.PathLike) -> list[CaptionedImage]:
    """Images only (for caption generation): every image file under ``image_dir``, sorted, ids 1, 2, ...

    Entries named like images that are no regular file (a folder, FIFO, device or broken link) are
    left out with a warning, never opened (reading a FIFO would block forever).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise MissingInputError(f"image folder {image_dir} does not exist")
    named = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = [p for p in named if p.is_file()]  # follows links; False for FIFOs, devices and folders
    others = [p for p in named if not p.is_file()]
    if others:
        log.warning("skipped %d entries of %s named like images that are not regular files (folders, FIFOs, "
                    "devices, broken links): %s%s", len(others), image_dir, ", ".join(map(str, others[:5])),
                    " ..." if len(others) > 5 else "")
    return [CaptionedImage(image_id, path, ()) for image_id, path in enumerate(files, start=1)]


def _inside(folder: Path, parts: Sequence[str], source: Path, where: str, field: str) -> Path:
    """``folder`` joined with the annotation's path ``parts``, refused (``AnnotationError`` naming the
    file, entry and field) unless it names a file inside ``folder``.

    The check is on the names, after resolving ``..``: an absolute path, or one climbing out
    (``../../etc/passwd``), is an annotation error. Symbolic links are not followed here: whoever
    owns the dataset folder placed them (a folder of images linked from another disk is common),
    while the annotation text may come from anyone.
    """
    relative = os.path.join(*parts)
    normal = os.path.normpath(relative) if relative else "."
    if "\0" in relative or os.path.isabs(relative) or normal in (".", "..") or normal.startswith(".." + os.sep):
        problem = ("holds a NUL character" if "\0" in relative else "is absolute" if os.path.isabs(relative)
                   else "names no file" if normal == "." else "leads out of it")
        raise AnnotationError(f"{source}: {field} of {where} ({relative!r}) {problem}; image paths must name "
                              f"a file inside the image folder {folder}")
    return folder.joinpath(*parts)


def _require(record: Any, field: str, kind: type, source: Path, where: str) -> Any:
    if not isinstance(record, dict) or field not in record:
        raise AnnotationError(f"{source}: {where} has no field '{field}'")
    value = record[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AnnotationError(f"{source}: field '{field}' of {where} should be {kind.__name__}, "
                              f"got {type(value).__name__}")
    return value


class CaptionDataset(Dataset[DatasetItem | None]):
    """Items of images with their encoded captions, in one of three ``captions_per_image`` modes.

    ``all``: one item per image carrying all its captions, so the module runs the CNN once per
    image and trains on every caption (validation and test use it: each image visited once).
    ``random``: one item per image with one of its captions drawn anew at each visit.
    ``pairs``: one item per (image, caption) pair, so an epoch visits every caption once and a
    batch of N items is N pairs, as the Show-Attend-Tell tutorial and im2txt train (an image is
    decoded once per caption and may appear twice in a batch).
    ``load_image`` gives an image's pixels (decoded from its file, or from a resized-image cache)
    or its cached encoder features.
    An image that fails to load yields its ``BadImageError``, not raised: it becomes the batch, raised in
    the main process (``checked_batch``), since a DataLoader worker's exception would reach it as a
    ``RuntimeError`` carrying the worker's traceback. With ``skip_bad_images`` it is logged once and
    yields ``None`` (``collate_captions`` drops it).
    """

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        encode_caption: Callable[[str], list[int]],
        load_image: Callable[[CaptionedImage], torch.Tensor],
        captions_per_image: str = "all",
        skip_bad_images: bool = False,
    ) -> None:
        check_choice(captions_per_image, CAPTIONS_PER_IMAGE, "captions_per_image")
        self.images = list(images)
        self.load_image = load_image
        self.captions_per_image = captions_per_image
        self.skip_bad_images = skip_bad_images
        self.encoded = [[torch.tensor(encode_caption(c)) for c in image.captions] for image in self.images]
        # pairs: item -> (image index, caption index); the other modes index images directly
        self.pairs = ([(row, caption) for row, captions in enumerate(self.encoded) for caption in range(len(captions))]
                      if captions_per_image == "pairs" else None)
        self._reported: set[int] = set()  # image indices, so an image of several pairs is logged once

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.images)

    def __getitem__(self, index: int) -> DatasetItem | BadImageError | None:
        index, caption = self.pairs[index] if self.pairs is not None else (index, None)
        image = self.images[index]
        try:
            pixels = self.load_image(image)
        except BadImageError as error:
            if not self.skip_bad_images:
                return BadImageError(error.path, error.reason,
                                     f"{error.detail} (data.on_bad_image=skip trains without it)")
            if index not in self._reported:
                self._reported.add(index)
                log.warning("skipped image %s: %s (%d skipped in this split so far)", error.path, error.detail,
                            len(self._reported))
            return None
        captions = self.encoded[index]
        if caption is not None:
            captions = [captions[caption]]
        elif self.captions_per_image == "random" and captions:
            captions = [random.choice(captions)]
        return DatasetItem(image.image_id, pixels, captions)
