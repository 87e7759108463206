"""Precomputed region features as an image source: the research codebases' layout (``<id>.npz`` with
``feat``, optional ``<id>.npy`` global vectors), converted once into a memory-mapped cache, batches
padded with a mask, and missing or malformed files handled as bad images are, with no image file."""

import io
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from captioning.config import check_config
from captioning.data import precomputed as precomputed_module
from captioning.data.batch import CaptionBatch, collate_captions
from captioning.data.build import build_datamodule
from captioning.data.datamodule import CaptionDataModule
from captioning.data.datasets import DatasetItem
from captioning.data.images import BadImageError
from captioning.data.sources import PrecomputedFeatures
from tests.conftest import PROJECT_ROOT, TINY_SHAPES

SPLITS = {split: {"annotations": f"annotations/captions_{split}.json", "images": f"images/{split}"}
          for split in ("train", "val", "test")}
DIM = 8
Features = dict[int, tuple[np.ndarray, np.ndarray | None]]  # image id -> (regions (n, DIM), fc (DIM,) or None)


def _annotations_only(tiny_shapes: Path, root: Path) -> Path:
    """The tiny dataset's captions without its images: precomputed features need no image file."""
    shutil.copytree(tiny_shapes / "annotations", root / "annotations")
    return root


def _image_ids(root: Path) -> list[int]:
    return sorted(image["id"] for split in SPLITS
                  for image in json.loads((root / SPLITS[split]["annotations"]).read_text())["images"])


def _write_features(folder: Path, image_ids: list[int], fc: bool, seed: int = 0) -> Features:
    """Random features as ruotianluo/ImageCaptioning.pytorch writes them: 1-7 regions per image."""
    rng = np.random.default_rng(seed)
    (folder / "att").mkdir(parents=True)
    if fc:
        (folder / "fc").mkdir()
    written: Features = {}
    for image_id in image_ids:
        regions = rng.standard_normal((int(rng.integers(1, 8)), DIM)).astype(np.float32)
        np.savez_compressed(folder / "att" / f"{image_id}.npz", feat=regions)
        vector = rng.standard_normal(DIM).astype(np.float32) if fc else None
        if fc:
            np.save(folder / "fc" / f"{image_id}.npy", vector)
        written[image_id] = (regions, vector)
    return written


def _datamodule(root: Path, tmp_path: Path, fc: bool = True, **settings: object) -> CaptionDataModule:
    precomputed = {"att_dir": "feats/att", "fc_dir": "feats/fc" if fc else None}
    return build_datamodule(root, SPLITS, min_word_count=1, batch_size=8, precomputed=precomputed,
                            feature_cache_dir=tmp_path / "cache", **settings)


@pytest.mark.parametrize("fc", [True, False])
def test_rows_are_the_global_vector_then_the_regions_and_no_image_is_read(tiny_shapes: Path, tmp_path: Path,
                                                                          fc: bool) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    written = _write_features(root / "feats", _image_ids(root), fc)
    data = _datamodule(root, tmp_path, fc, feature_cache_dtype="float32")
    data.setup()
    assert not (root / "images").exists()
    assert data.source.identity == {"class": "PrecomputedEncoder", "feature_dim": DIM}
    for image in data.corpus.unique_images():
        regions, vector = written[image.image_id]
        rows = data.source(image)
        assert rows.dtype == torch.float32 and rows.shape == (1 + len(regions), DIM)
        assert torch.equal(rows[1:], torch.from_numpy(regions))
        if fc:
            assert torch.equal(rows[0], torch.from_numpy(vector))
        else:
            assert torch.allclose(rows[0], torch.from_numpy(regions).mean(0), atol=1e-6)

    half = _datamodule(root, tmp_path, fc)  # the default float16: half the disk, within its precision
    half.setup()
    image = data.corpus.unique_images()[0]
    assert half.source(image).dtype == torch.float16
    assert torch.allclose(half.source(image).float(), data.source(image), atol=2e-3, rtol=1e-3)


def test_the_conversion_is_reused_until_a_file_changes(tiny_shapes: Path, tmp_path: Path) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    ids = _image_ids(root)
    written = _write_features(root / "feats", ids, fc=True)
    first = _datamodule(root, tmp_path)
    first.setup()
    again = _datamodule(root, tmp_path, num_workers=2)
    again.setup()
    assert again.source.cache.directory == first.source.cache.directory
    np.save(root / "feats" / "fc" / f"{ids[0]}.npy", written[ids[0]][1] + 1)
    changed = _datamodule(root, tmp_path, num_workers=2)  # converted in two worker processes
    changed.setup()
    assert changed.source.cache.directory != first.source.cache.directory
    image = next(i for i in changed.corpus.unique_images() if i.image_id == ids[0])
    assert torch.allclose(changed.source(image)[0].float(), torch.from_numpy(written[ids[0]][1] + 1), atol=1e-2)
    reopened = pickle.loads(pickle.dumps(changed.source))  # DataLoader workers reopen the memory maps
    assert torch.equal(reopened(image), changed.source(image))


def test_an_interrupted_conversion_keeps_its_finished_shards(tiny_shapes: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    ids = _image_ids(root)
    written = _write_features(root / "feats", ids, fc=False)
    monkeypatch.setattr(precomputed_module, "SHARD_SIZE", 8)
    read = precomputed_module.read_feature_rows
    converted: list[int] = []

    def interrupted(image_id: int, *folders: Path) -> np.ndarray:
        if image_id == ids[20]:
            raise KeyboardInterrupt
        converted.append(image_id)
        return read(image_id, *folders)

    monkeypatch.setattr(precomputed_module, "read_feature_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _datamodule(root, tmp_path, fc=False, feature_cache_dtype="float32").setup()
    monkeypatch.setattr(precomputed_module, "read_feature_rows", read)
    rerun = _datamodule(root, tmp_path, fc=False, feature_cache_dtype="float32")
    with caplog.at_level("INFO"):
        rerun.setup()
    assert "kept 2 finished shard(s) of an interrupted write" in caplog.text
    assert rerun.source.cache.verify() == [] and len(rerun.source.cache) == len(ids)
    for image in rerun.corpus.unique_images():  # two kept shards and the rest, in their ragged layout
        regions = written[image.image_id][0]
        assert torch.equal(rerun.source(image)[1:], torch.from_numpy(regions))


def test_batches_pad_the_regions_with_zeros_and_mask_them(tiny_shapes: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    written = _write_features(root / "feats", _image_ids(root), fc=True)
    data = _datamodule(root, tmp_path, feature_cache_dtype="float32")
    data.setup()
    batches = list(data.val_dataloader())
    for batch in batches:
        regions = [len(written[image_id][0]) for image_id in batch.image_ids.tolist()]
        assert batch.images is None and batch.features_from == data.source.identity
        assert batch.features.shape == (len(regions), 1 + max(regions), DIM)
        assert batch.feature_mask.dtype == torch.bool and batch.feature_mask.shape == (len(regions), max(regions))
        assert batch.feature_mask.sum(1).tolist() == regions
        for row, (count, image_id) in enumerate(zip(regions, batch.image_ids.tolist(), strict=True)):
            assert torch.equal(batch.features[row, 1:1 + count], torch.from_numpy(written[image_id][0]))
            assert not batch.features[row, 1 + count:].any()  # padding is zeros

    pinned_copies: list[torch.Tensor] = []

    def fake_pin(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        pinned_copies.append(tensor)  # a CPU-only machine cannot page-lock memory: record the call instead
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = pin_memory(batches[0])
    assert isinstance(pinned, CaptionBatch) and any(t is batches[0].feature_mask for t in pinned_copies)
    assert torch.equal(pinned.feature_mask, batches[0].feature_mask)


def test_rows_of_one_count_stack_as_before_with_no_mask() -> None:
    rows = [torch.randn(5, DIM), torch.randn(5, DIM)]
    items = [DatasetItem(i, r, [torch.tensor([1, 4, 2])]) for i, r in enumerate(rows)]
    batch = collate_captions(items, features_from={"class": "CNNEncoder"})
    assert batch.feature_mask is None and torch.equal(batch.features, torch.stack(rows))
    uneven = collate_captions([*items, DatasetItem(2, torch.randn(3, DIM), [torch.tensor([1, 2])])])
    assert uneven.feature_mask.tolist()[2] == [True, True, False, False]
    assert uneven.features.shape == (3, 5, DIM) and not uneven.features[2, 3:].any()


def _break_files(feats: Path, ids: list[int]) -> dict[str, str]:
    """Break one train image's files per way; returns each broken file's name and what the error says."""
    broken = {}
    (feats / "att" / f"{ids[0]}.npz").unlink()
    broken[f"{ids[0]}.npz"] = "feature file not found"
    (feats / "att" / f"{ids[1]}.npz").write_text("not an archive")
    broken[f"{ids[1]}.npz"] = "not a readable .npz archive"
    np.savez(feats / "att" / f"{ids[2]}.npz", features=np.ones((3, DIM), np.float32))
    broken[f"{ids[2]}.npz"] = "holds no array 'feat' \\(it holds features\\)"
    np.savez(feats / "att" / f"{ids[3]}.npz", feat=np.ones(DIM, np.float32))
    broken[f"{ids[3]}.npz"] = "'feat' has shape \\(8,\\), not \\(regions, dim\\)"
    np.save(feats / "fc" / f"{ids[4]}.npy", np.ones(DIM + 1, np.float32))
    broken[f"{ids[4]}.npy"] = "the global vector has shape \\(9,\\)"
    (feats / "fc" / f"{ids[5]}.npy").unlink()
    broken[f"{ids[5]}.npy"] = "feature file not found \\(data.precomputed.fc_dir\\)"
    return broken


def test_missing_or_malformed_files_stop_before_training_or_are_skipped_and_counted(
        tiny_shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    train_ids = sorted(i["id"] for i in json.loads((root / SPLITS["train"]["annotations"]).read_text())["images"])
    _write_features(root / "feats", _image_ids(root), fc=True)
    broken = _break_files(root / "feats", train_ids)
    with pytest.raises(ValueError, match="6 train images cannot be used.*data.on_bad_image=skip") as error:
        _datamodule(root, tmp_path).setup()
    for name, detail in broken.items():
        assert re.search(f"{name}: {detail}", str(error.value)), name

    lenient = _datamodule(root, tmp_path, on_bad_image="skip")
    with caplog.at_level("WARNING"):
        lenient.setup()
    assert f"train: skipped 6 of {TINY_SHAPES.num_train} images" in caplog.text
    assert f"skipped train image {root / 'feats' / 'att' / f'{train_ids[0]}.npz'}: feature file not found" \
        in caplog.text
    seen = torch.cat([batch.image_ids for batch in lenient.train_dataloader()])
    assert sorted(seen.tolist()) == train_ids[6:]


def test_files_that_fail_only_when_read_stop_before_training_or_are_skipped(tiny_shapes: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    ids = _image_ids(root)
    written = _write_features(root / "feats", ids, fc=False)
    np.savez(root / "feats" / "att" / f"{ids[0]}.npz", feat=np.full((2, DIM), np.nan, np.float32))  # header sound
    buffer = io.BytesIO()
    np.save(buffer, written[ids[1]][0])
    with zipfile.ZipFile(root / "feats" / "att" / f"{ids[1]}.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("feat.npy", buffer.getvalue()[:-4])  # a sound header, then too little data
    with pytest.raises(ValueError, match=f"2 images failed when reading them.*{ids[0]}.npz: holds NaN"):
        _datamodule(root, tmp_path, fc=False).setup()

    lenient = _datamodule(root, tmp_path, fc=False, on_bad_image="skip")
    with caplog.at_level("WARNING"):
        lenient.setup()
    assert "2 images failed when reading them for the image source and will be skipped" in caplog.text
    bad = [image for image in lenient.corpus.unique_images() if image.image_id in ids[:2]]
    for image in bad:
        with pytest.raises(BadImageError, match=f"{image.image_id}.npz"):
            lenient.source(image)


def test_a_wrong_folder_is_named(tiny_shapes: Path, tmp_path: Path) -> None:
    root = _annotations_only(tiny_shapes, tmp_path / "data")
    _write_features(root / "feats", _image_ids(root), fc=False)
    data = build_datamodule(root, SPLITS, min_word_count=1, precomputed={"att_dir": "elsewhere", "fc_dir": None},
                            feature_cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=f"none of the {TINY_SHAPES.num_train} train images has its file, "
                                                f"e.g. .*elsewhere.*npz: feature file not found.*check .*elsewhere"):
        data.setup()


def test_settings_that_conflict_or_are_unknown_are_refused(tmp_path: Path) -> None:
    for settings, message in (({"precomputed": {"att_dir": "a", "fc": "b"}}, "takes att_dir"),
                              ({"precomputed": {"fc_dir": "b"}}, "takes att_dir"),
                              ({"precomputed": {"att_dir": "a"}, "image_cache": True}, "turn off data.image_cache"),
                              ({"precomputed": {"att_dir": "a"}, "feature_cache": True}, "data.feature_cache")):
        with pytest.raises(ValueError, match=message):
            build_datamodule(tmp_path, SPLITS, **settings)


def test_karpathy_split_from_features_keyed_by_coco_id(shared_data: Path, tmp_path: Path) -> None:
    """The mini COCO set in Karpathy format, its features in an absolute folder, its images nowhere."""
    root = tmp_path / "coco"
    root.mkdir()
    shutil.copy(shared_data / "coco-val2017-mini" / "dataset_coco_mini.json", root)
    cocoids = [image["cocoid"] for image in json.loads((root / "dataset_coco_mini.json").read_text())["images"]]
    written = _write_features(tmp_path / "features", cocoids, fc=False)
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=coco2014_karpathy", "model=updown", f"paths.data_dir={root}", f"paths.cache_dir={tmp_path / 'cache'}",
            *(f"data.splits.{s}.annotations=dataset_coco_mini.json" for s in ("train", "val", "test")),
            f"data.precomputed={{att_dir:{tmp_path / 'features' / 'att'},fc_dir:null}}",
            "data.min_word_count=1", "data.num_workers=0", "data.batch_size=16"])
    check_config(cfg, ("data",))
    data = instantiate(cfg.data)
    assert isinstance(data.source, PrecomputedFeatures)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch.features.shape[-1] == DIM and batch.feature_mask is not None
    assert set(batch.image_ids.tolist()) <= set(cocoids)
    image_id = batch.image_ids[0].item()
    assert torch.equal(batch.features[0, 1:1 + len(written[image_id][0])].float(),
                       torch.from_numpy(written[image_id][0]).half().float())
    loader = DataLoader(data._datasets["val"], batch_size=4, num_workers=1, collate_fn=collate_captions)
    assert sum(len(b.image_ids) for b in loader) == len(data.corpus.images["val"])
