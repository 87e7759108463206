"""The data side of a run, built from the flat ``data`` settings (``conf/data/*.yaml``)."""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from captioning.data.corpus import CaptionCorpus
from captioning.data.datamodule import CaptionDataModule
from captioning.data.features import DTYPES, FeatureEncoder
from captioning.data.sources import CachedPixels, DecodedPixels, EncoderFeatures, ImageSource, PrecomputedFeatures
from captioning.errors import check_choice

FEATURE_BATCH_SIZE = 64  # images per encoder call when computing the feature cache (at least the batch size)


def build_datamodule(
    root: str | os.PathLike,
    splits: Mapping[str, Mapping[str, Any] | None],
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
    precomputed: Mapping[str, Any] | None = None,
    feature_encoder: FeatureEncoder | None = None,
) -> CaptionDataModule:
    """A ``CaptionDataModule`` over a ``CaptionCorpus`` (the annotation settings) and the image source the
    cache settings choose; ``CaptionCorpus`` and ``CaptionDataModule`` document each setting.

    ``image_cache``: decode and resize every image once into a memory-mapped cache under
    ``image_cache_dir`` (default ``root/cache``), reused while the images and size are unchanged.
    ``feature_cache``: batches carry the outputs of the frozen encoder ``feature_encoder`` (train.py
    builds it from ``model.encoder`` with the checkpoint's weights), computed once per image
    into ``feature_cache_dir`` (default ``root/cache/features``) as ``feature_cache_dtype``.
    ``precomputed``: ``{att_dir, fc_dir}``, folders (absolute, or relative to ``root``) of region
    features computed elsewhere (``PrecomputedFeatures``); batches carry them instead of pixels, no
    image file is read or needed, and they are converted once into ``feature_cache_dir`` as
    ``feature_cache_dtype``.
    """
    root = Path(root)
    pixels = (CachedPixels(image_size, image_cache_dir or root / "cache", num_workers) if image_cache
              else DecodedPixels(image_size))
    source: ImageSource = pixels
    if precomputed is not None:
        source = _precomputed_source(precomputed, root, image_cache, feature_cache, feature_cache_dir,
                                     feature_cache_dtype, num_workers, image_size)
    elif feature_cache:
        if feature_encoder is None:
            raise ValueError("data.feature_cache is on, but no encoder was given to compute the features: pass "
                             "feature_encoder (train.py builds the run's model.encoder)")
        check_choice(feature_cache_dtype, tuple(DTYPES), "data.feature_cache_dtype")  # before any data is read
        source = EncoderFeatures(pixels, feature_encoder, feature_cache_dir or root / "cache" / "features",
                                 feature_cache_dtype, max(batch_size, FEATURE_BATCH_SIZE), num_workers)
    corpus = CaptionCorpus(root, splits, format, merge_restval, split_ratios, split_seed, val_from_train,
                           min_word_count, on_bad_image, generate_shapes, probe=source.probe)
    return CaptionDataModule(corpus, source, batch_size, num_workers, max_caption_length, train_captions_per_image,
                             pin_memory)


def _precomputed_source(precomputed: Mapping[str, Any], root: Path, image_cache: bool, feature_cache: bool,
                        feature_cache_dir: str | os.PathLike | None, dtype: str, num_workers: int,
                        image_size: int) -> PrecomputedFeatures:
    """The ``data.precomputed`` source, its settings checked before any data is read."""
    unknown = sorted(set(precomputed) - {"att_dir", "fc_dir"})
    if unknown or not precomputed.get("att_dir"):
        raise ValueError(f"data.precomputed takes att_dir (a folder of <image id>.npz region features) and "
                         f"optionally fc_dir (<image id>.npy global vectors); got {dict(precomputed)}")
    on = [name for name, value in (("image_cache", image_cache), ("feature_cache", feature_cache)) if value]
    if on:
        raise ValueError(f"data.precomputed gives the features, so no image is decoded or encoded: turn off "
                         f"{' and '.join(f'data.{name}' for name in on)}")
    check_choice(dtype, tuple(DTYPES), "data.feature_cache_dtype")
    fc_dir = precomputed.get("fc_dir")
    return PrecomputedFeatures(root / precomputed["att_dir"], None if fc_dir is None else root / fc_dir,
                               feature_cache_dir or root / "cache" / "features", dtype, num_workers, image_size)
