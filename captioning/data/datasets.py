"""Caption datasets: the COCO-format loader and the torch ``Dataset`` every split goes through."""

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class CaptionedImage:
    """One image and its reference captions (raw text, as annotated)."""

    image_id: int
    path: Path
    captions: tuple[str, ...]


@dataclass(frozen=True)
class DatasetItem:
    """What a dataset yields for one image: pixels and its encoded captions."""

    image_id: int
    image: torch.Tensor  # (3, H, W)
    captions: list[torch.Tensor]  # each (caption_length + 2,): <bos> words <eos>


def load_coco_captions(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> list[CaptionedImage]:
    """Read a COCO caption file (``{"images": [...], "annotations": [...]}``), ordered by image id."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        with open(annotation_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {annotation_file} does not exist") from None
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{annotation_file} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{annotation_file}: expected a JSON object with 'images' and 'annotations'")
    images = _require(data, "images", list, annotation_file, "the top-level object")
    annotations = _require(data, "annotations", list, annotation_file, "the top-level object")

    files: dict[int, str] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        image_id = _require(image, "id", int, annotation_file, where)
        if image_id in files:
            raise AnnotationError(f"{annotation_file}: {where} repeats image id {image_id}")
        files[image_id] = _require(image, "file_name", str, annotation_file, where)

    captions: dict[int, list[str]] = {image_id: [] for image_id in files}
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        image_id = _require(annotation, "image_id", int, annotation_file, where)
        caption = _require(annotation, "caption", str, annotation_file, where)
        if image_id not in captions:
            raise AnnotationError(f"{annotation_file}: {where} refers to image id {image_id}, "
                                  "which is not in 'images'")
        captions[image_id].append(caption)

    return [CaptionedImage(image_id, image_dir / files[image_id], tuple(captions[image_id]))
            for image_id in sorted(files)]


def _require(record: Any, field: str, kind: type, source: Path, where: str) -> Any:
    if not isinstance(record, dict) or field not in record:
        raise AnnotationError(f"{source}: {where} has no field '{field}'")
    value = record[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AnnotationError(f"{source}: field '{field}' of {where} should be {kind.__name__}, "
                              f"got {type(value).__name__}")
    return value


class CaptionDataset(Dataset[DatasetItem]):
    """One item per image, carrying all its captions or one drawn at random per visit.

    Encoding every caption of an image in one item lets the module run the CNN once per image
    and train on all its captions; validation and test visit each image exactly once.
    """

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        encode_caption: Callable[[str], list[int]],
        transform: Callable[[Image.Image], torch.Tensor],
        captions_per_image: str = "all",
    ) -> None:
        if captions_per_image not in ("all", "random"):
            raise ValueError(f"captions_per_image must be 'all' or 'random', got {captions_per_image!r}")
        self.images = list(images)
        self.transform = transform
        self.captions_per_image = captions_per_image
        self.encoded = [[torch.tensor(encode_caption(c)) for c in image.captions] for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> DatasetItem:
        image = self.images[index]
        with Image.open(image.path) as file:
            pixels = self.transform(file.convert("RGB"))
        captions = self.encoded[index]
        if self.captions_per_image == "random" and captions:
            captions = [random.choice(captions)]
        return DatasetItem(image.image_id, pixels, captions)
