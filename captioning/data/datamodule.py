"""Lightning data module: splits -> vocabulary -> encoded captions -> ``CaptionBatch``es."""

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from captioning.data.batch import CaptionBatch, collate_captions
from captioning.data.datasets import (CAPTIONS_PER_IMAGE, FORMATS, CaptionDataset, CaptionedImage,
                                      load_annotations)
from captioning.data.features import FeatureCache, FeatureEncoder, write_feature_cache
from captioning.data.files import ShardedCache
from captioning.data.image_cache import ImageCache, write_image_cache
from captioning.data.images import BadImageError, open_rgb, probe_image
from captioning.data.shapes import SPLITS, ShapesConfig, ensure_shapes_dataset
from captioning.data.tokenize import tokenize
from captioning.data.transforms import build_image_transform
from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("error", "skip")
MAX_LISTED = 20  # bad images named one by one in the log; the rest are counted


class DecodedPixels:
    """An image's pixels decoded from its file and resized (picklable for DataLoader workers)."""

    def __init__(self, image_size: int) -> None:
        self.transform = build_image_transform(image_size)

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        return self.transform(open_rgb(image.path)[0])


class FromCache:
    """What a cache holds for an image instead of decoding it: resized pixels (bit-identical to
    ``DecodedPixels``) from an ``ImageCache``, or encoder outputs (1 + k*k, encoder_dim) from a ``FeatureCache``."""

    def __init__(self, cache: ShardedCache) -> None:
        self.cache = cache

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        return self.cache.tensor(image.image_id)


class CaptionDataModule(pl.LightningDataModule):
    """Caption data in any supported format; the vocabulary comes from the training captions alone.

    ``splits`` maps train / val / test to ``{"annotations": file, "images": dir}`` relative to
    ``root``, plus ``"subsets"``: the Karpathy splits (or a folder table's split names) that make it
    up. ``merge_restval`` adds Karpathy's ``restval`` to train, as the standard recipes do.
    ``val_from_train``: that many train images, drawn by ``split_seed`` (the same on every rank and
    run), become the val split instead of ``splits["val"]`` (for datasets whose only captioned
    held-out images are the test split); the vocabulary comes from the train images left.
    ``train_captions_per_image`` (``all``, ``random`` or ``pairs``; see ``CaptionDataset``) is how
    training items carry captions; validation and test always use ``all``.
    ``generate_shapes`` (the built-in dataset's settings) writes ``root`` on first use.
    ``on_bad_image``: ``error`` stops before training at the first missing, unreadable or oversized
    image (named, with the reason); ``skip`` leaves such images out, logging each and the count.
    ``image_cache``: decode and resize every image once into a memory-mapped cache under
    ``image_cache_dir`` (reused while the images and size are unchanged), then train from it.
    ``feature_cache``: batches carry a frozen encoder's outputs, computed once per image into
    ``feature_cache_dir`` (as ``feature_cache_dtype``) by ``use_encoder_features``, instead of pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        splits: Mapping[str, Mapping[str, Any]],
        format: str = "coco",
        merge_restval: bool = True,
        split_ratios: Mapping[str, float] | None = None,
        split_seed: int = 0,
        val_from_train: int | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        min_word_count: int = 5,
        max_caption_length: int = 16,
        train_captions_per_image: str = "all",
        on_bad_image: str = "error",
        image_cache: bool = False,
        image_cache_dir: str | os.PathLike | None = None,
        feature_cache: bool = False,
        feature_cache_dir: str | os.PathLike | None = None,
        feature_cache_dtype: str = "float16",
        generate_shapes: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        splits = {name: paths for name, paths in splits.items() if paths is not None}
        if val_from_train is not None:
            if val_from_train < 1:
                raise ValueError(f"data.val_from_train must be a number of images >= 1 or null, "
                                 f"got {val_from_train}")
            if "val" in splits:
                raise ValueError(f"data.val_from_train={val_from_train} draws the val split from train, but "
                                 f"data.splits.val is given too ({dict(splits['val'])}): remove one of them "
                                 "(~data.splits.val on the command line, or data.val_from_train=null)")
        needed = [s for s in SPLITS if not (s == "val" and val_from_train is not None)]
        missing = [s for s in needed if s not in splits]
        if missing:
            raise ValueError(f"data.splits lacks {missing}; each of {needed} needs 'annotations' and 'images'")
        if train_captions_per_image not in CAPTIONS_PER_IMAGE:
            raise ValueError(f"data.train_captions_per_image must be one of {CAPTIONS_PER_IMAGE}, "
                             f"got {train_captions_per_image!r}")
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.root = Path(root)
        self.splits = {name: dict(paths) for name, paths in splits.items()}
        self.format = format
        self.merge_restval = merge_restval
        self.split_ratios = dict(split_ratios) if split_ratios else None
        self.split_seed = split_seed
        self.val_from_train = val_from_train
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_word_count = min_word_count
        self.max_caption_length = max_caption_length
        self.train_captions_per_image = train_captions_per_image
        self.on_bad_image = on_bad_image
        self.image_cache = image_cache
        self.image_cache_dir = Path(image_cache_dir) if image_cache_dir else self.root / "cache"
        self.feature_cache = feature_cache
        self.feature_cache_dir = Path(feature_cache_dir) if feature_cache_dir else self.root / "cache" / "features"
        self.feature_cache_dtype = feature_cache_dtype
        self.features: FeatureCache | None = None
        self._pixels: DecodedPixels | FromCache | None = None  # set by setup()
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
        loaded = {split: self._load(split) for split in SPLITS if split in self.splits}
        if self.val_from_train is not None:
            loaded["train"], loaded["val"] = self._hold_out(loaded["train"])
        for split in SPLITS:
            self._images[split] = self._usable(split, loaded[split])
        train_tokens = [tokenize(c) for image in self._images["train"] for c in image.captions]
        self.vocab = Vocabulary.build(train_tokens, self.min_word_count)
        self._log_statistics(train_tokens)
        load_image = self._pixels = self._image_loader()
        for split in SPLITS:
            sampling = self.train_captions_per_image if split == "train" else "all"
            self._datasets[split] = CaptionDataset(self._images[split], self._encode, load_image, sampling,
                                                   skip_bad_images=self.on_bad_image == "skip")

    def use_encoder_features(self, encoder: FeatureEncoder) -> None:
        """Serve ``encoder``'s cached outputs instead of pixels from now on (``feature_cache``; after ``setup``).

        Computes the cache where the encoder is (move it to a GPU first to compute there), unless
        one for this encoder, these images and this size is complete; ranks wait for the writer.
        """
        if not self._datasets:
            raise RuntimeError("call setup() before use_encoder_features()")
        self.features = write_feature_cache(encoder, self._unique_images(), self._pixels,
                                            self.feature_cache_dir, self.image_size, self.feature_cache_dtype,
                                            batch_size=max(self.batch_size, 64), num_workers=self.num_workers)
        self._check_unreadable(self.features, "computing its encoder features")
        for dataset in self._datasets.values():
            dataset.load_image = FromCache(self.features)

    def _unique_images(self) -> list[CaptionedImage]:
        unique = {image.image_id: image for split in SPLITS for image in self._images[split]}  # val may be test
        return list(unique.values())

    def _image_loader(self) -> DecodedPixels | FromCache:
        if not self.image_cache:
            return DecodedPixels(self.image_size)
        images = self._unique_images()
        write_image_cache(images, self.image_cache_dir, self.image_size, progress=True, workers=self.num_workers)
        cache = ImageCache.open(self.image_cache_dir, self.image_size, images)
        self._check_unreadable(cache, "caching it")
        return FromCache(cache)

    def _check_unreadable(self, cache: ShardedCache, doing: str) -> None:
        """Images whose header was sound but whose data failed when a cache read them: stop now
        (``on_bad_image=error``) rather than mid-epoch, or count them (``skip``: the datasets skip them)."""
        wanted = {image.image_id for image in self._unique_images()}
        bad = [entry.error() for image_id, entry in sorted(cache.bad.items()) if image_id in wanted]
        if not bad:
            return
        if self.on_bad_image == "error":
            listed = "; ".join(str(error) for error in bad[:MAX_LISTED])
            more = " ..." if len(bad) > MAX_LISTED else ""
            raise ValueError(f"{len(bad)} images failed when {doing}: {listed}{more}. Fix or remove them, or set "
                             "data.on_bad_image=skip to train on the rest")
        log.warning("%d images failed when %s and will be skipped, e.g. %s", len(bad), doing, bad[0])

    def _load(self, split: str) -> list[CaptionedImage]:
        paths = self.splits[split]
        subsets = list(paths.get("subsets") or [split])
        if self.format == "karpathy" and split == "train" and self.merge_restval and "restval" not in subsets:
            subsets.append("restval")
        annotations = paths.get("annotations")
        known = sorted({subset for name, spec in self.splits.items() for subset in (spec.get("subsets") or [name])})
        return load_annotations(self.format, self.root / annotations if annotations else None,
                                self.root / paths["images"], subsets, self.split_ratios, self.split_seed, known)

    def _hold_out(self, train: list[CaptionedImage]) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
        """(train, val): ``val_from_train`` captioned train images move to val.

        The draw takes the ids that rank first by a hash of (``split_seed``, id): it depends only on
        the seed and the annotations (the same on every rank and Python version), and adding k
        images to the file changes at most k of the drawn ones. It precedes the image checks, so a
        broken or repaired image file changes no draw (with ``on_bad_image=skip`` val may lose it).
        """
        captioned = sorted({image.image_id for image in train if image.captions})
        if len(captioned) < self.val_from_train + 1:
            raise ValueError(f"data.val_from_train={self.val_from_train} needs at least {self.val_from_train + 1} "
                             f"captioned train images (the rest stay in train), but the train split has "
                             f"{len(captioned)}: lower data.val_from_train or use data.splits.val")
        rank = {image_id: hashlib.sha256(f"{self.split_seed}:{image_id}".encode()).digest() for image_id in captioned}
        drawn = set(sorted(captioned, key=rank.__getitem__)[:self.val_from_train])
        log.info("val: %d of %d captioned train images held out (data.val_from_train, seed %d)",
                 len(drawn), len(captioned), self.split_seed)
        return ([image for image in train if image.image_id not in drawn],
                [image for image in train if image.image_id in drawn])

    def _usable(self, split: str, images: list[CaptionedImage]) -> list[CaptionedImage]:
        """The split's images that have captions and a sound header (or an error, per ``on_bad_image``)."""
        captioned = [image for image in images if image.captions]
        if len(captioned) < len(images):
            log.warning("%s: skipped %d images that have no caption", split, len(images) - len(captioned))
        bad: list[BadImageError] = []
        for image in captioned:
            try:
                probe_image(image.path)
            except BadImageError as error:
                bad.append(error)
        if bad and len(bad) == len(captioned) and all(error.reason == "missing" for error in bad):
            raise FileNotFoundError(f"none of the {len(bad)} {split} images exists, e.g. {bad[0].path}: check "
                                    f"data.root ({self.root}) and data.splits.{split}.images")
        if bad and self.on_bad_image == "error":
            listed = "; ".join(str(error) for error in bad[:MAX_LISTED])
            raise ValueError(f"{len(bad)} {split} images cannot be used: {listed}"
                             f"{' ...' if len(bad) > MAX_LISTED else ''}. Fix or remove them, or set "
                             "data.on_bad_image=skip to train on the rest")
        for error in bad[:MAX_LISTED]:
            log.warning("skipped %s image %s", split, error)
        if bad:
            log.warning("%s: skipped %d of %d images that cannot be used%s", split, len(bad), len(captioned),
                        f" (the first {MAX_LISTED} named above)" if len(bad) > MAX_LISTED else "")
        unusable = {error.path for error in bad}
        usable = [image for image in captioned if image.path not in unusable]
        if not usable:
            raise ValueError(f"the {split} split has no usable captioned image (root {self.root}, "
                             f"{self.splits[split]})")
        return usable

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

    def split_image_ids(self) -> dict[str, list[int]]:
        """The image ids of each split as used (after ``setup``), to record beside a run: with
        ``val_from_train`` or skipped images they are not in any annotation file."""
        if not self._datasets:
            raise RuntimeError("call setup() before split_image_ids()")
        return {split: [image.image_id for image in self._images[split]] for split in SPLITS}

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
        if self.feature_cache and self.features is None:
            raise RuntimeError("data.feature_cache is on, but no encoder was given: call "
                               "use_encoder_features(model.captioner.encoder) after setup() (train.py does)")
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_captions,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
