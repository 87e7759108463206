"""The batch structure the data module hands to the model side."""

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from captioning.data.datasets import DatasetItem
from captioning.data.images import BadImageError
from captioning.data.vocab import Vocabulary


Batch = TypeVar("Batch")


@dataclass
class CaptionBatch:
    """Images (as pixels or as cached encoder features) with their captions.

    Exactly one of ``images`` and ``features`` is set: ``features`` when the data module reads a
    feature cache, and the model then skips its encoder. ``caption_image_index[j]`` is the image
    row that caption ``j`` describes, so the encoder runs once per image however many captions
    it has; captions come longest first, not grouped by image. With ``train_captions_per_image=pairs``
    every row has one caption and the same image may fill several rows (``image_ids`` then repeats).
    ``features_from`` identifies the encoder that computed ``features`` (``CNNEncoder.cache_identity()``),
    so the model can refuse another encoder's.
    Precomputed region features have a different number of regions per image: ``features`` is then
    zero-padded to the batch's most and ``feature_mask`` says which regions (rows after the global
    row) are real.
    """

    images: torch.Tensor | None  # (batch, 3, H, W) pixels in [0, 1]
    features: torch.Tensor | None  # (batch, 1 + k*k or 1 + max regions, encoder_dim): global row, then grid/regions
    image_ids: torch.Tensor  # (batch,)
    tokens: torch.Tensor  # (num_captions, max_len): <bos> words <eos>, then <pad>=0
    lengths: torch.Tensor  # (num_captions,) tokens per caption, <bos> and <eos> included
    caption_image_index: torch.Tensor  # (num_captions,)
    features_from: dict[str, Any] | None = field(default=None, compare=False)
    feature_mask: torch.Tensor | None = None  # (batch, max regions) bool, True for real regions; None: all real

    def pin_memory(self) -> "CaptionBatch":
        """Page-locked copies (``DataLoader(pin_memory=True)`` calls this), so copies to a GPU run async."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def checked_batch(batch: Batch | BadImageError) -> Batch:
    """``batch``; a batch that is an image's ``BadImageError`` is raised instead. An image that failed to load
    in a DataLoader worker process comes to the main process as the batch, since raised in the worker it
    would arrive as a ``RuntimeError`` carrying the worker's traceback. The data module's hook calls it, and
    the module's steps for loaders handed to the Trainer without the data module."""
    if isinstance(batch, BadImageError):
        raise batch
    return batch


def collate_captions(items: Sequence[DatasetItem | BadImageError | None], features_from: dict[str, Any] | None = None
                     ) -> CaptionBatch | BadImageError | None:
    """Stack images (or features, computed by the encoder ``features_from``) and pad every caption in the
    batch to the longest one; features with different row counts are zero-padded, with a mask.

    ``None`` items (images skipped as unreadable) are dropped; a batch of nothing is ``None``,
    which the module skips. An image that failed to load (``data.on_bad_image=error``) makes the batch
    its ``BadImageError``, which ``checked_batch`` raises in the main process.
    """
    failed = next((item for item in items if isinstance(item, BadImageError)), None)
    if failed is not None:
        return failed
    items = [item for item in items if item is not None]
    if not items:
        return None
    # longest first (a stable sort): teacher forcing runs a shrinking prefix of the captions and need not reorder
    pairs = sorted(((caption, row) for row, item in enumerate(items) for caption in item.captions),
                   key=lambda pair: -len(pair[0]))
    captions, owners = [caption for caption, _ in pairs], [row for _, row in pairs]
    tokens = (pad_sequence(captions, batch_first=True, padding_value=Vocabulary.PAD_ID)
              if captions else torch.zeros(0, 0, dtype=torch.long))
    cached = items[0].image.dim() == 2  # features are (rows, dim) per image, pixels (3, H, W)
    rows = [len(item.image) for item in items] if cached else []
    mask = None
    if cached and min(rows) < max(rows):
        stacked = pad_sequence([item.image for item in items], batch_first=True)  # zeros after each image's rows
        mask = torch.arange(max(rows) - 1) < torch.tensor(rows)[:, None] - 1  # (batch, max regions): not row 0
    else:
        stacked = torch.stack([item.image for item in items])
    return CaptionBatch(
        images=None if cached else stacked,
        features=stacked if cached else None,
        image_ids=torch.tensor([item.image_id for item in items]),
        tokens=tokens,
        lengths=torch.tensor([len(c) for c in captions], dtype=torch.long),
        caption_image_index=torch.tensor(owners, dtype=torch.long),
        features_from=features_from if cached else None,
        feature_mask=mask,
    )
