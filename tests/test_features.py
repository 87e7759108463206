"""The feature cache: training from cached encoder outputs equals running the frozen CNN, and the key works."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from captioning.data.batch import CaptionBatch
from captioning.data.build import build_datamodule
from captioning.data.datamodule import CaptionDataModule
from captioning.data.datasets import load_annotations
from captioning.data.features import FeatureCache, write_feature_cache
from captioning.data.images import BadImageError
from captioning.data.sources import DecodedPixels
from captioning.models.decoders import ShowAttendTellDecoder
from captioning.models.encoder_decoder import build_encoder, target_of
from captioning.models.encoders import CNNEncoder, EncodedImages
from captioning.module import CaptioningLitModule
from tests.conftest import TINY_SHAPES

CNN = target_of(CNNEncoder)
SHOW_ATTEND_TELL = target_of(ShowAttendTellDecoder)

SPLITS = {split: {"annotations": f"annotations/captions_{split}.json", "images": f"images/{split}"}
          for split in ("train", "val", "test")}
ENCODER = {"_target_": CNN, "backbone": "resnet18", "grid_size": 2, "trainable_stages": 0}
DECODER = {"_target_": SHOW_ATTEND_TELL, "embed_dim": 16, "hidden_size": 32, "attention_dim": 16, "dropout": 0.5}
IMAGE_SIZE = 64
TINY_TRAIN_IMAGES = TINY_SHAPES.num_train


def _datamodule(root: Path, cache_dir: Path, **settings: object) -> CaptionDataModule:
    return build_datamodule(root, SPLITS, image_size=IMAGE_SIZE, batch_size=6, min_word_count=1,
                            feature_cache_dir=cache_dir, **settings)


def _set_up(root: Path, cache_dir: Path, **settings: object) -> CaptionDataModule:
    data = _datamodule(root, cache_dir, **settings)
    data.setup()
    return data


def _encoder(seed: int = 0) -> CNNEncoder:
    """The encoder ``_module(data, seed)`` gets: built first, from the same seed."""
    torch.manual_seed(seed)
    return build_encoder(ENCODER)


def _module(data: CaptionDataModule, seed: int = 0) -> CaptioningLitModule:
    torch.manual_seed(seed)
    return CaptioningLitModule(data.vocab.tokens, ENCODER, DECODER,
                            optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def _first_train_batch(data: CaptionDataModule) -> CaptionBatch:
    """The first 6 train items, collated as the data module's loaders do (features carry their encoder)."""
    dataset = data._datasets["train"]
    return data.train_dataloader().collate_fn([dataset[i] for i in range(6)])


def _train_images(root: Path):
    return load_annotations("coco", root / "annotations/captions_train.json", root / "images/train")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("float16", 2e-3)])
def test_training_from_cached_features_gives_the_frozen_cnns_loss_and_gradients(
        tiny_shapes: Path, tmp_path: Path, dtype: str, tolerance: float) -> None:
    pixels = _set_up(tiny_shapes, tmp_path)
    module = _module(pixels)
    cached = _set_up(tiny_shapes, tmp_path, feature_cache=True, feature_cache_dtype=dtype,
                     feature_encoder=module.net.encoder)

    from_pixels, from_features = _first_train_batch(pixels), _first_train_batch(cached)
    assert from_pixels.features is None and from_features.images is None
    assert from_pixels.features_from is None
    assert from_features.features_from == cached.source.identity == module.net.encoder.cache_identity()
    assert from_features.features.shape == (6, 1 + 2 * 2, module.net.encoder.output_dim)
    assert from_features.features.dtype == getattr(torch, dtype)
    assert torch.equal(from_pixels.tokens, from_features.tokens)

    losses, gradients = [], []
    for batch in (from_pixels, from_features):
        module.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both passes
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        gradients.append(torch.cat([p.grad.flatten() for p in module.net.decoder.parameters()]))
    assert losses[0].item() > 1.0  # an untrained model's real loss, not zero
    torch.testing.assert_close(losses[1], losses[0], rtol=tolerance, atol=0)
    assert (gradients[1] - gradients[0]).norm() < tolerance * gradients[0].norm()  # the same update direction
    assert all(p.grad is None for p in module.net.encoder.parameters())  # frozen: nothing to train


def test_cached_rows_are_the_encoders_global_vector_and_grid(tiny_shapes: Path, tmp_path: Path) -> None:
    images = _train_images(tiny_shapes)[:5]
    torch.manual_seed(0)
    encoder = build_encoder(ENCODER)
    cache = write_feature_cache(encoder, images, DecodedPixels(IMAGE_SIZE), tmp_path, IMAGE_SIZE, "float32",
                                batch_size=2, progress=False)
    pixels = torch.stack([DecodedPixels(IMAGE_SIZE)(image) for image in images])
    with torch.no_grad():
        expected = encoder(pixels)
    rows = torch.stack([cache.tensor(image.image_id) for image in images])
    restored = EncodedImages.from_rows(rows)
    # batches of 2 vs 5 images: convolutions may round differently in the last bits
    torch.testing.assert_close(restored.global_features, expected.global_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored.grid_features, expected.grid_features, rtol=1e-4, atol=1e-5)


def _count_encodings(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    calls: list[int] = []
    original = CNNEncoder.feature_rows

    def counting(self: CNNEncoder, images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # as if the job were stopped mid-write
        return original(self, images)

    monkeypatch.setattr(CNNEncoder, "feature_rows", counting)
    return calls


def test_the_key_covers_weights_size_grid_dtype_and_files(tiny_shapes: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    images = _train_images(tiny_shapes)[:4]
    torch.manual_seed(0)
    encoder = build_encoder(ENCODER)
    load = DecodedPixels(IMAGE_SIZE)
    calls = _count_encodings(monkeypatch)
    first = write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, progress=False)
    assert sum(calls) == 4
    again = write_feature_cache(encoder, list(reversed(images)), load, tmp_path, IMAGE_SIZE, progress=False)
    assert again.directory == first.directory and sum(calls) == 4  # complete: reused, nothing computed
    assert first.verify() == []

    folders = {first.directory}
    other_grid = build_encoder({**ENCODER, "grid_size": 1})
    other_grid.load_state_dict(encoder.state_dict())
    variants = [
        write_feature_cache(other_grid, images, load, tmp_path, IMAGE_SIZE, progress=False),
        write_feature_cache(encoder, images, DecodedPixels(32), tmp_path, 32, progress=False),
        write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, "float32", progress=False),
    ]
    with torch.no_grad():
        encoder.stages[-1][0].conv1.weight[0, 0, 0, 0] += 1e-3  # one weight changes
    variants.append(write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, progress=False))
    stat = images[0].path.stat()
    os.utime(images[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file was touched
    variants.append(write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, progress=False))
    folders |= {cache.directory for cache in variants}
    assert len(folders) == 6 and sum(calls) == 6 * 4
    assert variants[0].tensor(images[0].image_id).shape == (2, encoder.output_dim)  # global + a 1x1 grid


def test_an_interrupted_write_leaves_no_cache_and_a_rerun_computes_it(tiny_shapes: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    images = _train_images(tiny_shapes)[:6]
    encoder = build_encoder(ENCODER)
    load = DecodedPixels(IMAGE_SIZE)
    _count_encodings(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, batch_size=2, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []  # only staging and lock
    calls = _count_encodings(monkeypatch)
    cache = write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, batch_size=2, progress=False)
    assert sum(calls) == 6 and len(cache) == 6 and not list(tmp_path.glob(".*.partial*"))

    shard = cache.directory / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])  # damaged on disk: no longer complete, so computed again
    rewritten = write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, batch_size=2, progress=False)
    assert sum(calls) == 12 and rewritten.directory == cache.directory and rewritten.verify() == []


def test_unreadable_images_are_recorded_and_raise_when_read(tiny_shapes: Path, tmp_path: Path) -> None:
    images = _train_images(tiny_shapes)[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images[1] = type(images[1])(images[1].image_id, broken, images[1].captions)
    cache = write_feature_cache(build_encoder(ENCODER), images, DecodedPixels(IMAGE_SIZE), tmp_path / "cache",
                                IMAGE_SIZE, progress=False)
    assert len(cache) == 2 and images[1].image_id not in cache
    with pytest.raises(BadImageError, match="broken.png"):
        cache.tensor(images[1].image_id)
    reopened = FeatureCache(cache.directory, cache.manifest)
    assert torch.equal(reopened.tensor(images[0].image_id), cache.tensor(images[0].image_id))


def test_a_loader_of_another_size_than_the_key_is_refused(tiny_shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keyed for 64 px"):
        write_feature_cache(build_encoder(ENCODER), _train_images(tiny_shapes)[:2], DecodedPixels(32), tmp_path,
                            IMAGE_SIZE, progress=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # no cache under the wrong key


def test_features_beyond_the_stored_dtype_or_not_finite_are_refused(tiny_shapes: Path, tmp_path: Path) -> None:
    encoder = build_encoder(ENCODER).eval()
    images, load = _train_images(tiny_shapes)[:2], DecodedPixels(IMAGE_SIZE)
    with torch.no_grad():
        encoder.stages[-1][-1].bn2.bias.fill_(1e6)  # outputs beyond float16's 65504
    with pytest.raises(ValueError, match=r"reach 1e\+06, beyond float16's range .* data.feature_cache_dtype=float32"):
        write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, progress=False)
    assert write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, "float32", progress=False).tensor(
        images[0].image_id).isfinite().all()
    with torch.no_grad():
        encoder.stages[-1][-1].bn2.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite .* check its weights"):
        write_feature_cache(encoder, images, load, tmp_path, IMAGE_SIZE, "float32", progress=False)


def test_a_trainable_encoder_cannot_be_cached(tiny_shapes: Path, tmp_path: Path) -> None:
    encoder = build_encoder({**ENCODER, "trainable_stages": 1})
    with pytest.raises(ValueError, match="trainable_stages=0"):
        write_feature_cache(encoder, _train_images(tiny_shapes)[:2], DecodedPixels(IMAGE_SIZE), tmp_path,
                            IMAGE_SIZE, progress=False)


@pytest.mark.filterwarnings("ignore:Found \\d+ module\\(s\\) in eval mode")
def test_features_of_another_encoder_are_refused_at_fit_time(tiny_shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feature_cache is on, but no encoder .* pass feature_encoder"):
        _datamodule(tiny_shapes, tmp_path, feature_cache=True)
    data = _datamodule(tiny_shapes, tmp_path, feature_cache=True,
                       feature_encoder=_encoder(seed=0))  # computes the cache in setup()
    other = _module(data, seed=1)  # other random weights than those the cache was computed with
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(ValueError, match="another encoder"):
        trainer.fit(other, datamodule=data)
    computed_with = _module(data, seed=0).net.encoder.cache_identity()
    assert data.source.identity == computed_with != other.net.encoder.cache_identity()


def test_a_pickled_cache_reopens_its_memory_maps(tiny_shapes: Path, tmp_path: Path) -> None:
    images = _train_images(tiny_shapes)[:3]
    cache = write_feature_cache(build_encoder(ENCODER), images, DecodedPixels(IMAGE_SIZE), tmp_path, IMAGE_SIZE,
                                progress=False)
    expected = cache.tensor(images[2].image_id)
    copy = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker receives
    assert copy._shards == {} and torch.equal(copy.tensor(images[2].image_id), expected)


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_an_image_that_fails_only_when_decoded_stops_before_training_or_is_skipped(
        tiny_shapes: Path, tmp_path: Path, on_bad_image: str, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, root)
    damaged = sorted((root / "images" / "train").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:200])  # the header is sound, the pixels are cut off
    data = _datamodule(root, tmp_path / "cache", feature_cache=True, on_bad_image=on_bad_image,
                       feature_encoder=_encoder())
    if on_bad_image == "error":
        with pytest.raises(ValueError, match=f"1 images failed when reading them for the image source: {damaged}"):
            data.setup()
        return
    with caplog.at_level("WARNING"):
        data.setup()
    assert "1 images failed when reading them for the image source and will be skipped" in caplog.text
    dataset = data._datasets["train"]
    items = [dataset[i] for i in range(len(dataset))]
    assert sum(item is None for item in items) == 1 and len(items) == TINY_TRAIN_IMAGES


def test_batches_pin_their_tensors_for_the_gpu_copy(tiny_shapes: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = _datamodule(tiny_shapes, tmp_path, feature_cache=True, feature_encoder=_encoder())
    data.setup()
    batch = _first_train_batch(data)
    pinned_copies: list[torch.Tensor] = []

    def fake_pin(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        pinned_copies.append(tensor)  # a CPU-only machine cannot page-lock memory: record the call instead
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = pin_memory(batch)  # what DataLoader(pin_memory=True) applies to every batch
    assert isinstance(pinned, CaptionBatch) and pinned.images is None
    assert len(pinned_copies) == 5 and torch.equal(pinned.features, batch.features)
    assert pinned.features.data_ptr() != batch.features.data_ptr()
    assert pinned.features_from == batch.features_from == data.source.identity  # the encoder check survives pinning
