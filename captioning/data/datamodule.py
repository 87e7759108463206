"""Lightning data module: a corpus and an image source -> encoded captions -> ``CaptionBatch``es."""

import logging
from functools import partial

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from captioning.data.batch import CaptionBatch, checked_batch, collate_captions
from captioning.data.corpus import CaptionCorpus
from captioning.data.datasets import CAPTIONS_PER_IMAGE, SPLITS, CaptionDataset
from captioning.data.images import BadImageError
from captioning.data.sources import ImageSource
from captioning.data.tokenize import tokenize
from captioning.data.vocab import Vocabulary
from captioning.errors import check_choice

log = logging.getLogger(__name__)


class CaptionDataModule(pl.LightningDataModule):
    """Batches of a corpus's splits, each image read from ``source`` (pixels or cached features).

    ``setup`` prepares the source for every image of the run (writing a cache the first time, on
    the trainer's device for features; concurrent ranks wait for one writer), then builds the
    datasets. ``train_captions_per_image`` (``all``, ``random`` or ``pairs``; see ``CaptionDataset``)
    is how training items carry captions; validation and test always use ``all``. Batches from a
    feature source carry the identity of the encoder that computed them (``features_from``).
    Built from the flat ``data`` settings by ``captioning.data.build.build_datamodule``.
    """

    def __init__(
        self,
        corpus: CaptionCorpus,
        source: ImageSource,
        batch_size: int = 32,
        num_workers: int = 0,
        max_caption_length: int = 16,
        train_captions_per_image: str = "all",
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        check_choice(train_captions_per_image, CAPTIONS_PER_IMAGE, "data.train_captions_per_image")
        self.corpus = corpus
        self.source = source
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_caption_length = max_caption_length
        self.train_captions_per_image = train_captions_per_image
        self.pin_memory = pin_memory
        self._datasets: dict[str, CaptionDataset] = {}

    @property
    def vocab(self) -> Vocabulary:
        return self.corpus.vocab

    @property
    def image_size(self) -> int:
        return self.source.image_size

    def references(self, split: str) -> dict[int, list[str]]:
        """Raw reference captions of a split by image id, as the evaluator wants them."""
        return self.corpus.references(split)

    def prepare_data(self) -> None:
        self.corpus.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Prepare the source and build the datasets once (idempotent; the same on every rank)."""
        if self._datasets:
            return
        images = self.corpus.unique_images()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.corpus.check_unreadable(self.source.prepare(images, device), "reading them for the image source")
        self._log_truncation()
        for split in SPLITS:
            sampling = self.train_captions_per_image if split == "train" else "all"
            self._datasets[split] = CaptionDataset(self.corpus.images[split], self._encode, self.source, sampling,
                                                   skip_bad_images=self.corpus.skip_bad_images)

    def _encode(self, caption: str) -> list[int]:
        return self.vocab.encode(tokenize(caption), self.max_caption_length)

    def _log_truncation(self) -> None:
        lengths = self.corpus.train_caption_lengths
        log.info("%d of %d train captions truncated to %d words (data.max_caption_length)",
                 sum(n > self.max_caption_length for n in lengths), len(lengths), self.max_caption_length)

    def train_dataloader(self) -> DataLoader[CaptionBatch]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[CaptionBatch]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[CaptionBatch]:
        return self._loader("test", shuffle=False)

    def on_before_batch_transfer(self, batch: CaptionBatch | BadImageError | None, dataloader_idx: int
                                 ) -> CaptionBatch | None:
        """A batch that is an image's ``BadImageError`` raises it here, in the main process."""
        return checked_batch(batch)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[CaptionBatch]:
        if not self._datasets:
            raise RuntimeError("call setup() before asking for a data loader (the Trainer does)")
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=partial(collate_captions, features_from=self.source.identity),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
