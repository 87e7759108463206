"""Lightning data module: splits -> vocabulary -> encoded captions -> ``CaptionBatch``es."""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from captioning.data.batch import CaptionBatch, collate_captions
from captioning.data.datasets import CaptionDataset, CaptionedImage, load_coco_captions
from captioning.data.shapes import SPLITS, ShapesConfig, ensure_shapes_dataset
from captioning.data.tokenize import tokenize
from captioning.data.transforms import build_image_transform
from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)


class CaptionDataModule(pl.LightningDataModule):
    """COCO-format caption data; the vocabulary comes from the training captions alone.

    ``splits`` maps each split to ``{"annotations": file, "images": dir}``, relative to ``root``.
    ``generate_shapes`` (the built-in dataset's settings) writes ``root`` on first use.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        splits: Mapping[str, Mapping[str, str]],
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        min_word_count: int = 5,
        max_caption_length: int = 16,
        train_captions_per_image: str = "all",
        generate_shapes: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"data.splits lacks {missing}; each of {SPLITS} needs 'annotations' and 'images'")
        self.root = Path(root)
        self.splits = {name: dict(paths) for name, paths in splits.items()}
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_word_count = min_word_count
        self.max_caption_length = max_caption_length
        self.train_captions_per_image = train_captions_per_image
        self.shapes_config = ShapesConfig(**generate_shapes) if generate_shapes is not None else None
        self.pin_memory = pin_memory
        self.vocab: Vocabulary | None = None
        self._images: dict[str, list[CaptionedImage]] = {}
        self._datasets: dict[str, CaptionDataset] = {}

    def prepare_data(self) -> None:
        if self.shapes_config is not None:
            ensure_shapes_dataset(self.root, self.shapes_config)

    def setup(self, stage: str | None = None) -> None:
        """Load every split and build the vocabulary once (idempotent; same result on every rank)."""
        if self._datasets:
            return
        for split in SPLITS:
            paths = self.splits[split]
            images = load_coco_captions(self.root / paths["annotations"], self.root / paths["images"])
            self._images[split] = [image for image in images if image.captions]
            if len(self._images[split]) < len(images):
                log.warning("%s: skipped %d images that have no caption", self.root / paths["annotations"],
                            len(images) - len(self._images[split]))
        train_tokens = [tokenize(c) for image in self._images["train"] for c in image.captions]
        self.vocab = Vocabulary.build(train_tokens, self.min_word_count)
        self._log_statistics(train_tokens)
        transform = build_image_transform(self.image_size)
        for split in SPLITS:
            sampling = self.train_captions_per_image if split == "train" else "all"
            self._datasets[split] = CaptionDataset(self._images[split], self._encode, transform, sampling)

    def _encode(self, caption: str) -> list[int]:
        return self.vocab.encode(tokenize(caption), self.max_caption_length)

    def _log_statistics(self, train_tokens: list[list[str]]) -> None:
        lengths = sorted(len(t) for t in train_tokens)
        truncated = sum(n > self.max_caption_length for n in lengths)
        log.info(
            "data: %s images (train/val/test), vocabulary %d words (min count %d), train <unk> rate %.2f%%, "
            "caption length median %d / max %d, %d train captions truncated to %d words",
            "/".join(str(len(self._images[s])) for s in SPLITS), len(self.vocab), self.min_word_count,
            100 * self.vocab.unknown_rate(train_tokens), lengths[len(lengths) // 2] if lengths else 0,
            lengths[-1] if lengths else 0, truncated, self.max_caption_length,
        )

    def references(self, split: str) -> dict[int, list[str]]:
        """Raw reference captions of a split by image id, as the evaluator wants them."""
        return {image.image_id: list(image.captions) for image in self._images[split]}

    def train_dataloader(self) -> DataLoader[CaptionBatch]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[CaptionBatch]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[CaptionBatch]:
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[CaptionBatch]:
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_captions,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
