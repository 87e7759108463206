"""The caption corpus of a run: its splits' images and captions, checked, and the vocabulary of train."""

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from captioning.data.datasets import FORMATS, SPLITS, CaptionedImage, MissingInputError, load_annotations
from captioning.data.images import BadImage, BadImageError, probe_image
from captioning.data.shapes import ShapesConfig, ensure_shapes_dataset
from captioning.data.tokenize import tokenize
from captioning.data.vocab import Vocabulary
from captioning.errors import InputError, check_choice
from captioning.progress import progress_bar

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("error", "skip")
MAX_LISTED = 20  # bad images named one by one in the log; the rest are counted


class CaptionCorpus:
    """Every split's captioned, usable images, and the vocabulary built from the training captions alone.

    ``splits`` maps train / val / test to ``{"annotations": file, "images": dir}`` relative to
    ``root``, plus ``"subsets"``: the Karpathy splits (or a folder table's split names) that make it
    up. ``merge_restval`` adds Karpathy's ``restval`` to train, as the standard recipes do.
    ``val_from_train``: that many train images, drawn by ``split_seed`` (the same on every rank and
    run), become the val split instead of ``splits["val"]`` (for datasets whose only captioned
    held-out images are the test split); the vocabulary comes from the train images left.
    ``on_bad_image``: ``error`` stops before training at the first missing, unreadable or oversized
    image (named, with the reason); ``skip`` leaves such images out, logging each and the count.
    ``probe`` checks an image's files cheaply, raising ``BadImageError``: the image source's own
    (``ImageSource.probe``: the image header, or precomputed feature files when no image file is
    read at all); by default the image file's header.
    ``generate_shapes`` (the built-in dataset's settings) writes ``root`` on first use (``prepare``).
    Loading happens once, on first use of ``images``, ``vocab`` or ``references``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        splits: Mapping[str, Mapping[str, Any] | None],
        format: str = "coco",
        merge_restval: bool = True,
        split_ratios: Mapping[str, float] | None = None,
        split_seed: int = 0,
        val_from_train: int | None = None,
        min_word_count: int = 5,
        on_bad_image: str = "error",
        generate_shapes: Mapping[str, Any] | None = None,
        probe: Callable[[CaptionedImage], None] | None = None,
    ) -> None:
        splits = {name: dict(paths) for name, paths in splits.items() if paths is not None}
        if val_from_train is not None:
            if val_from_train < 1:
                raise ValueError(f"data.val_from_train must be a number of images >= 1 or null, "
                                 f"got {val_from_train}")
            if "val" in splits:
                raise ValueError(f"data.val_from_train={val_from_train} draws the val split from train, but "
                                 f"data.splits.val is given too ({splits['val']}): remove one of them "
                                 "(~data.splits.val on the command line, or data.val_from_train=null)")
        needed = [s for s in SPLITS if not (s == "val" and val_from_train is not None)]
        missing = [s for s in needed if s not in splits]
        if missing:
            raise ValueError(f"data.splits lacks {missing}; each of {needed} needs 'annotations' and 'images'")
        check_choice(format, FORMATS, "data.format")
        check_choice(on_bad_image, ON_BAD_IMAGE, "data.on_bad_image")
        self.root = Path(root)
        self.splits = splits
        self.format = format
        self.merge_restval = merge_restval
        self.split_ratios = dict(split_ratios) if split_ratios else None
        self.split_seed = split_seed
        self.val_from_train = val_from_train
        self.min_word_count = min_word_count
        self.on_bad_image = on_bad_image
        self.probe = probe or _probe_header
        self.shapes_config = ShapesConfig(**generate_shapes) if generate_shapes is not None else None
        self._images: dict[str, list[CaptionedImage]] = {}
        self._vocab: Vocabulary | None = None
        self.train_caption_lengths: list[int] = []  # in words, once loaded

    def prepare(self) -> None:
        """Write the built-in dataset if it is generated and absent (once, on one process)."""
        if self.shapes_config is not None:
            ensure_shapes_dataset(self.root, self.shapes_config)

    @property
    def images(self) -> dict[str, list[CaptionedImage]]:
        """Each split's usable captioned images (loaded and checked on first use)."""
        if not self._images:
            self._load()
        return self._images

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary of the training captions (words seen ``min_word_count`` times or more)."""
        if self._vocab is None:
            self._load()
        return self._vocab

    @property
    def skip_bad_images(self) -> bool:
        return self.on_bad_image == "skip"

    def unique_images(self) -> list[CaptionedImage]:
        """Every image of every split once (val may be test)."""
        return list({image.image_id: image for split in SPLITS for image in self.images[split]}.values())

    def references(self, split: str) -> dict[int, list[str]]:
        """Raw reference captions of a split by image id, as the evaluator wants them."""
        return {image.image_id: list(image.captions) for image in self.images[split]}

    def split_image_ids(self) -> dict[str, list[int]]:
        """The image ids of each split as used, to record beside a run: with ``val_from_train`` or
        skipped images they are not in any annotation file."""
        return {split: [image.image_id for image in self.images[split]] for split in SPLITS}

    def check_unreadable(self, bad: Mapping[int, BadImage], doing: str) -> None:
        """Images whose header was sound but whose data failed when a cache read them: stop now
        (``on_bad_image=error``) rather than mid-epoch, or count them (``skip``: the datasets skip them)."""
        wanted = {image.image_id for image in self.unique_images()}
        errors = [entry.error() for image_id, entry in sorted(bad.items()) if image_id in wanted]
        if not errors:
            return
        if self.on_bad_image == "error":
            raise InputError(f"{len(errors)} images failed when {doing}: {_listed(errors)}. Fix or remove them, or "
                             "set data.on_bad_image=skip to train on the rest")
        log.warning("%d images failed when %s and will be skipped, e.g. %s", len(errors), doing, errors[0])

    def _load(self) -> None:
        loaded = {split: self._read(split) for split in SPLITS if split in self.splits}
        if self.val_from_train is not None:
            loaded["train"], loaded["val"] = self._hold_out(loaded["train"])
        images = {split: self._usable(split, loaded[split]) for split in SPLITS}
        train_tokens = [tokenize(c) for image in images["train"] for c in image.captions]
        self._vocab = Vocabulary.build(train_tokens, self.min_word_count)
        self._images = images
        self.train_caption_lengths = [len(tokens) for tokens in train_tokens]
        self._log_statistics(train_tokens)

    def _read(self, split: str) -> list[CaptionedImage]:
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
        """The split's images that have captions and pass the probe (or an error, per ``on_bad_image``)."""
        captioned = [image for image in images if image.captions]
        if len(captioned) < len(images):
            log.warning("%s: skipped %d images that have no caption", split, len(images) - len(captioned))
        bad: list[BadImageError] = []
        unusable: set[int] = set()
        with progress_bar(True) as bar:  # a header read per image: minutes on COCO's 123k over a network disk
            for image in bar.track(captioned, description=f"checking the {split} images"):
                try:
                    self.probe(image)
                except BadImageError as error:
                    bad.append(error)
                    unusable.add(image.image_id)
        if bad and len(bad) == len(captioned) and all(error.reason == "missing" for error in bad):
            if bad[0].path == Path(captioned[0].path):
                raise MissingInputError(f"none of the {len(bad)} {split} images exists, e.g. {bad[0].path}: check "
                                        f"data.root ({self.root}) and data.splits.{split}.images")
            raise MissingInputError(f"none of the {len(bad)} {split} images has its file, e.g. {bad[0]}: check "
                                    f"{bad[0].path.parent}")
        if bad and self.on_bad_image == "error":
            raise InputError(f"{len(bad)} {split} images cannot be used: {_listed(bad)}. Fix or remove them, or set "
                             "data.on_bad_image=skip to train on the rest")
        for error in bad[:MAX_LISTED]:
            log.warning("skipped %s image %s", split, error)
        if bad:
            log.warning("%s: skipped %d of %d images that cannot be used%s", split, len(bad), len(captioned),
                        f" (the first {MAX_LISTED} named above)" if len(bad) > MAX_LISTED else "")
        usable = [image for image in captioned if image.image_id not in unusable]
        if not usable:
            raise InputError(f"the {split} split has no usable captioned image (root {self.root}, "
                             f"{self.splits[split]})")
        return usable

    def _log_statistics(self, train_tokens: list[list[str]]) -> None:
        lengths = sorted(self.train_caption_lengths)
        log.info("data: %s images (train/val/test), vocabulary %d words (min count %d), train <unk> rate %.2f%%, "
                 "caption length median %d / max %d",
                 "/".join(str(len(self._images[s])) for s in SPLITS), len(self._vocab), self.min_word_count,
                 100 * self._vocab.unknown_rate(train_tokens), lengths[len(lengths) // 2] if lengths else 0,
                 lengths[-1] if lengths else 0)


def _probe_header(image: CaptionedImage) -> None:
    probe_image(image.path)


def _listed(errors: list[BadImageError]) -> str:
    """The first ``MAX_LISTED`` errors, then ``...``: a message stays readable with thousands of bad images."""
    return "; ".join(str(error) for error in errors[:MAX_LISTED]) + (" ..." if len(errors) > MAX_LISTED else "")
