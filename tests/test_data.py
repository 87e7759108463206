import csv
import json
import pickle
import random
import re
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from pycocotools.coco import COCO

from captioning.data.batch import collate_captions
from captioning.data.build import build_datamodule
from captioning.data.datasets import (
    KARPATHY_SPLITS,
    AnnotationError,
    load_annotations,
    load_caption_table,
    load_coco_captions,
    load_karpathy_split,
)
from captioning.data.images import BadImageError, open_rgb, probe_image
from captioning.data.tokenize import tokenize
from captioning.data.vocab import SPECIAL_TOKENS, Vocabulary
from tests.conftest import PROJECT_ROOT, TINY_SHAPES

SPLITS = {split: {"annotations": f"annotations/captions_{split}.json", "images": f"images/{split}"}
          for split in ("train", "val", "test")}


def _assert_loader_agrees_with_pycocotools(annotation_file: Path, image_dir: Path) -> None:
    images = load_coco_captions(annotation_file, image_dir)
    coco = COCO(str(annotation_file))
    assert [i.image_id for i in images] == sorted(coco.getImgIds())
    assert sum(len(i.captions) for i in images) == len(coco.getAnnIds())
    for image in images:
        assert list(image.captions) == [a["caption"] for a in coco.imgToAnns[image.image_id]]
        assert image.path == image_dir / coco.imgs[image.image_id]["file_name"]


def test_the_loader_reads_generated_files_as_pycocotools_does(tiny_shapes: Path) -> None:
    for split, paths in SPLITS.items():
        _assert_loader_agrees_with_pycocotools(tiny_shapes / paths["annotations"], tiny_shapes / paths["images"])
        assert all(p.path.is_file() for p in load_coco_captions(tiny_shapes / paths["annotations"],
                                                                tiny_shapes / paths["images"]))


def test_the_loader_reads_real_coco_annotations(shared_data: Path) -> None:
    mini = shared_data / "coco-val2017-mini"
    _assert_loader_agrees_with_pycocotools(mini / "annotations" / "captions_mini.json", mini / "val2017")
    images = load_coco_captions(mini / "annotations" / "captions_mini.json", mini / "val2017")
    assert len(images) == 250 and sum(len(i.captions) for i in images) == 1250
    assert all(i.path.is_file() for i in images)


@pytest.mark.parametrize(("content", "message"), [
    ('{"images": [', "is not valid JSON"),
    ('{"annotations": []}', "has no field 'images'"),
    ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] has no field 'file_name'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
     r"annotations\[0\] has no field 'caption'"),
    ('{"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}', "should be int, got str"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}',
     "refers to image id 2"),
])
def test_malformed_annotations_name_the_file_and_the_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "captions_bad.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as error:
        load_coco_captions(path, tmp_path)
    assert str(path) in str(error.value)


def test_tokenize_lowercases_and_drops_punctuation_like_the_ptb_tokenizer() -> None:
    assert tokenize("Two shapes: a Red circle, and a blue square.") == [
        "two", "shapes", "a", "red", "circle", "and", "a", "blue", "square"]
    assert tokenize("A man's black-and-white dog doesn't bark!") == [
        "a", "man", "'s", "black-and-white", "dog", "does", "n't", "bark"]


def test_vocabulary_round_trips_and_applies_min_count() -> None:
    captions = [["a", "red", "circle"], ["a", "red", "square"], ["a", "blue", "circle"]]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.tokens[:4] == list(SPECIAL_TOKENS) and vocab.pad_id == 0
    assert vocab.tokens[4:] == ["a", "circle", "red"]  # by count, then alphabetically
    ids = vocab.encode(["a", "red", "circle"])
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert vocab.decode(ids) == ["a", "red", "circle"]
    assert vocab.decode(vocab.encode(["a", "blue", "square"])) == ["a", "<unk>", "<unk>"]
    assert vocab.encode(["a", "red", "circle"], max_length=2) == [vocab.bos_id, 4, 6, vocab.eos_id]
    assert Vocabulary(vocab.tokens) == vocab
    assert vocab.unknown_rate(captions) == pytest.approx(2 / 9)
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", "b"])


def test_collate_pads_with_zero_and_maps_captions_to_their_images(tiny_shapes: Path) -> None:
    datamodule = build_datamodule(tiny_shapes, SPLITS, image_size=64, batch_size=4, min_word_count=1)
    datamodule.setup()
    dataset = datamodule._datasets["val"]
    batch = collate_captions([dataset[0], dataset[1]])
    assert batch.images.shape == (2, 3, 64, 64)
    assert sorted(batch.caption_image_index.tolist()) == [0] * 5 + [1] * 5
    lengths = batch.lengths.tolist()
    assert lengths == sorted(lengths, reverse=True)  # longest first: teacher forcing needs no reordering
    for row, length in enumerate(lengths):
        assert batch.tokens[row, 0] == datamodule.vocab.bos_id
        assert batch.tokens[row, length - 1] == datamodule.vocab.eos_id
        assert (batch.tokens[row, length:] == 0).all()
    references = datamodule.references("val")
    for image, image_id in enumerate(sorted(references)[:2]):
        rows = (batch.caption_image_index == image).nonzero().flatten()
        decoded = sorted(" ".join(datamodule.vocab.decode(batch.tokens[row])) for row in rows)
        assert decoded == sorted(" ".join(tokenize(c)) for c in references[image_id])


def test_datamodule_visits_every_evaluation_image_once_and_builds_vocab_from_train(tiny_shapes: Path) -> None:
    datamodule = build_datamodule(tiny_shapes, SPLITS, image_size=64, batch_size=5, min_word_count=1)
    datamodule.setup()
    seen = torch.cat([b.image_ids for b in datamodule.val_dataloader()]).tolist()
    assert sorted(seen) == sorted(datamodule.references("val")) and len(seen) == TINY_SHAPES.num_val
    train_words = {w for captions in datamodule.references("train").values() for c in captions for w in tokenize(c)}
    assert set(datamodule.vocab.tokens[4:]) == train_words


def test_random_caption_sampling_draws_one_caption_per_image(tiny_shapes: Path) -> None:
    datamodule = build_datamodule(tiny_shapes, SPLITS, image_size=64, batch_size=6, min_word_count=1,
                                   train_captions_per_image="random")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.tokens.shape[0] == 6 and sorted(batch.caption_image_index.tolist()) == list(range(6))


def test_pair_sampling_visits_every_caption_once_per_epoch(tiny_shapes: Path) -> None:
    datamodule = build_datamodule(tiny_shapes, SPLITS, image_size=32, batch_size=8, min_word_count=1,
                                   train_captions_per_image="pairs")
    datamodule.setup()
    dataset = datamodule._datasets["train"]
    expected = Counter((image.image_id, tuple(caption.tolist()))
                       for image, captions in zip(dataset.images, dataset.encoded, strict=True) for caption in captions)
    assert len(dataset) == sum(len(i.captions) for i in dataset.images) == TINY_SHAPES.num_train * 5
    assert all(len(dataset[index].captions) == 1 for index in (0, 1, len(dataset) - 1))
    batches = list(datamodule.train_dataloader())
    seen = Counter((image_id, tuple(tokens[:length].tolist())) for batch in batches
                   for image_id, tokens, length in zip(batch.image_ids[batch.caption_image_index].tolist(),
                                                       batch.tokens, batch.lengths.tolist(), strict=True))
    assert seen == expected  # every pair exactly once
    for batch in batches[:-1]:  # 240 pairs: 30 full batches of 8 pairs, one caption per image row
        assert batch.images.shape[0] == batch.tokens.shape[0] == 8
        assert sorted(batch.caption_image_index.tolist()) == list(range(8))
    assert len(datamodule._datasets["val"]) == TINY_SHAPES.num_val  # evaluation stays one item per image
    with pytest.raises(ValueError, match="train_captions_per_image must be one of"):
        build_datamodule(tiny_shapes, SPLITS, train_captions_per_image="pair")


def _coco(root: Path, name: str, num_images: int, first_id: int = 1) -> dict[str, str]:
    """A COCO-format split under ``root``: 8x8 images, two captions each, one word unique to each image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_id, first_id + num_images):
        file_name = f"{image_id:06d}.png"
        Image.new("RGB", (8, 8), (image_id % 255, 0, 0)).save(root / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name})
        annotations += [{"id": 2 * image_id + k, "image_id": image_id, "caption": f"a photo of thing{image_id}"}
                        for k in range(2)]
    (root / f"{name}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return {"annotations": f"{name}.json", "images": "images"}


def test_val_from_train_holds_out_a_seeded_stable_draw(tmp_path: Path) -> None:
    splits = {"train": _coco(tmp_path, "train", 40), "test": _coco(tmp_path, "test", 6, first_id=100)}
    train_ids = list(range(1, 41))

    def split_ids(seed: int) -> dict[str, list[int]]:
        datamodule = build_datamodule(tmp_path, splits, image_size=8, min_word_count=1, val_from_train=10,
                                       split_seed=seed)
        datamodule.setup()
        ids = datamodule.corpus.split_image_ids()
        assert {f"thing{i}" for i in ids["train"]} <= set(datamodule.vocab.tokens)
        assert not {f"thing{i}" for i in ids["val"]} & set(datamodule.vocab.tokens)  # vocabulary: train left
        assert sorted(datamodule.references("val")) == ids["val"]
        return ids

    random.seed(1)
    ids = split_ids(0)
    assert len(ids["val"]) == 10 and len(ids["train"]) == 30 and ids["test"] == list(range(100, 106))
    assert not set(ids["val"]) & set(ids["train"]) and sorted(ids["val"] + ids["train"]) == train_ids
    random.seed(2)
    torch.manual_seed(2)
    assert split_ids(0) == ids  # global RNG state (which differs between ranks) plays no part
    assert split_ids(1)["val"] != ids["val"]


def test_val_from_train_errors_name_the_setting(tmp_path: Path) -> None:
    splits = {"train": _coco(tmp_path, "train", 12), "test": _coco(tmp_path, "test", 2, first_id=100)}
    with pytest.raises(ValueError, match=r"data.val_from_train=12 needs at least 13 captioned train images.*has 12"):
        build_datamodule(tmp_path, splits, val_from_train=12).setup()
    with pytest.raises(ValueError, match=r"data.val_from_train=3 draws the val split from train, but "
                                         r"data.splits.val is given too"):
        build_datamodule(tmp_path, {**splits, "val": splits["test"]}, val_from_train=3)
    with pytest.raises(ValueError, match=r"data.val_from_train must be a number of images >= 1"):
        build_datamodule(tmp_path, splits, val_from_train=0)
    with pytest.raises(ValueError, match=r"lacks \['val'\]"):
        build_datamodule(tmp_path, splits)
    before_setup = build_datamodule(tmp_path, splits, min_word_count=1, val_from_train=3).corpus.split_image_ids()
    assert {split: len(ids) for split, ids in before_setup.items()} == {"train": 9, "val": 3, "test": 2}  # not empty


def test_coco2017_config_validates_on_train_images_and_tests_on_val2017(shared_data: Path) -> None:
    mini = shared_data / "coco-val2017-mini"
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=coco2017", f"paths.data_dir={mini}", "data.splits.train.annotations=annotations/captions_mini.json",
            "data.splits.train.images=val2017", "data.splits.test.annotations=annotations/captions_mini.json",
            "data.splits.test.images=val2017", "data.val_from_train=25", "data.image_size=32"])
    assert "val" not in cfg.data.splits
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    ids = datamodule.corpus.split_image_ids()
    assert [len(ids[s]) for s in ("train", "val", "test")] == [225, 25, 250]
    assert not set(ids["val"]) & set(ids["train"])


def test_missing_split_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks \\['test'\\]"):
        build_datamodule(tmp_path, {k: v for k, v in SPLITS.items() if k != "test"})


def test_images_without_captions_are_skipped_and_counted(tiny_shapes: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tiny_shapes, root)
    annotation_file = root / "annotations" / "captions_val.json"
    data = json.loads(annotation_file.read_text())
    dropped = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped]
    annotation_file.write_text(json.dumps(data))
    datamodule = build_datamodule(root, SPLITS, image_size=64, min_word_count=1)
    with caplog.at_level("WARNING"):
        datamodule.setup()
    assert "skipped 1 images that have no caption" in caplog.text
    assert dropped not in datamodule.references("val")
    assert len(datamodule.references("val")) == TINY_SHAPES.num_val - 1


def test_karpathy_split_sizes_ids_and_restval_merge(shared_data: Path) -> None:
    mini = shared_data / "coco-val2017-mini"
    karpathy_file = mini / "dataset_coco_mini.json"
    entries = json.loads(karpathy_file.read_text())["images"]
    sizes = {split: len(load_karpathy_split(karpathy_file, mini, [split])) for split in KARPATHY_SPLITS}
    assert sizes == {split: sum(e["split"] == split for e in entries) for split in KARPATHY_SPLITS}
    assert sizes == {"train": 175, "restval": 25, "val": 25, "test": 25}
    coco = COCO(str(mini / "annotations" / "captions_mini.json"))
    for image in load_karpathy_split(karpathy_file, mini):
        assert image.path.is_file() and image.image_id in coco.imgs  # ids are COCO ids
        assert coco.imgs[image.image_id]["file_name"] == image.path.name
        assert len(image.captions) == 5
    splits = {split: {"annotations": "dataset_coco_mini.json", "images": ".", "subsets": [split]}
              for split in ("train", "val", "test")}
    merged = build_datamodule(mini, splits, format="karpathy", image_size=32, min_word_count=1)
    merged.setup()
    assert [len(merged.references(s)) for s in ("train", "val", "test")] == [200, 25, 25]
    apart = build_datamodule(mini, splits, format="karpathy", merge_restval=False, image_size=32, min_word_count=1)
    apart.setup()
    assert len(apart.references("train")) == 175


def test_the_grayscale_coco_photo_loads_as_three_channels(shared_data: Path) -> None:
    mini = shared_data / "coco-val2017-mini"
    splits = {s: {"annotations": "annotations/captions_mini.json", "images": "val2017"}
              for s in ("train", "val", "test")}
    datamodule = build_datamodule(mini, splits, image_size=32, min_word_count=1)
    datamodule.setup()
    dataset = datamodule._datasets["val"]
    modes = {image.image_id: Image.open(image.path).mode for image in dataset.images}
    grayscale = [index for index, image in enumerate(dataset.images) if modes[image.image_id] == "L"]
    assert len(grayscale) == 1
    item = dataset[grayscale[0]]
    assert item.image.shape == (3, 32, 32)
    assert torch.equal(item.image[0], item.image[1]) and torch.equal(item.image[1], item.image[2])


def _folder(tmp_path: Path, rows: list[dict], table: str = "captions.jsonl") -> Path:
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in {row["file"] for row in rows}:
        Image.new("RGB", (8, 8), (len(name) * 20 % 255, 0, 0)).save(images / name)
    if table.endswith(".csv"):
        with open(tmp_path / table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        (tmp_path / table).write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return tmp_path / table


def test_folder_tables_with_a_split_column_or_a_seeded_ratio(tmp_path: Path) -> None:
    rows = [{"file": "b.jpg", "caption": "a dog", "split": "train"}, {"file": "a.jpg", "caption": "a cat",
            "split": "val"}, {"file": "b.jpg", "caption": "one dog", "split": "train"},
            {"file": "c.png", "caption": "a car", "split": "test"}]
    table = _folder(tmp_path / "jsonl", rows)
    train = load_annotations("folder", table, tmp_path / "jsonl" / "images", ["train"])
    assert [(i.image_id, i.path.name, i.captions) for i in train] == [(2, "b.jpg", ("a dog", "one dog"))]
    assert [i.path.name for i in load_annotations("folder", table, tmp_path / "jsonl" / "images", ["val"])] == ["a.jpg"]

    many = [{"file": f"{n:03d}.jpg", "caption": f"picture {n}"} for n in range(200)]
    csv_table = _folder(tmp_path / "csv", many, "captions.csv")
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    assigned = {s: {i.path.name for i in load_caption_table(csv_table, tmp_path / "csv" / "images", [s], ratios, 7)}
                for s in ratios}
    assert sum(map(len, assigned.values())) == 200 and 130 <= len(assigned["train"]) <= 190
    more = _folder(tmp_path / "csv", many + [{"file": "new.jpg", "caption": "a new picture"}], "captions.csv")
    again = {s: {i.path.name for i in load_caption_table(more, tmp_path / "csv" / "images", [s], ratios, 7)}
             for s in ratios}
    assert all(assigned[s] <= again[s] for s in ratios)  # adding a file moves no other file
    other_seed = {i.path.name for i in load_caption_table(csv_table, tmp_path / "csv" / "images", ["train"], ratios, 8)}
    assert other_seed != assigned["train"]


def test_a_folder_row_with_a_split_no_one_uses_is_an_error(tmp_path: Path) -> None:
    rows = [{"file": "a.jpg", "caption": "a cat", "split": "train"}, {"file": "b.jpg", "caption": "a dog", "split": "tarin"}]
    table = _folder(tmp_path, rows)
    with pytest.raises(AnnotationError, match=r"line 2 puts b.jpg in split 'tarin', which no split of this run uses; "
                                              r"the splits are \['test', 'train', 'val'\]"):
        load_annotations("folder", table, tmp_path / "images", ["train"], known_splits=["train", "val", "test"])
    assert [i.path.name for i in load_annotations("folder", table, tmp_path / "images", ["train"])] == ["a.jpg"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "a.jpg", "caption": "x"}\n{"file": "a.jpg"}\n')
    with pytest.raises(AnnotationError, match=r"bad.jsonl: line 2 has no field 'caption'"):
        load_caption_table(bad, tmp_path)
    (tmp_path / "bad.csv").write_text("name,caption\na.jpg,x\n")
    with pytest.raises(AnnotationError, match=r"lacks the column\(s\) \['file'\]"):
        load_caption_table(tmp_path / "bad.csv", tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes('{"file": "a.jpg", "caption": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(AnnotationError, match="latin1.jsonl is not UTF-8"):
        load_caption_table(tmp_path / "latin1.jsonl", tmp_path)


def _break_images(root: Path) -> tuple[Path, Path]:
    """In a copy of the tiny dataset: delete one train image, truncate another (its header survives)."""
    train = sorted((root / "images" / "train").iterdir())
    missing, truncated = train[0], train[1]
    missing.unlink()
    larger = root / "larger.png"
    Image.open(truncated).convert("RGB").resize((256, 256)).save(larger)
    data = larger.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a PNG cut in its pixel data
    larger.unlink()
    return missing, truncated


def test_bad_images_stop_before_training_or_are_skipped_and_counted(tiny_shapes: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tiny_shapes, root)
    missing, truncated = _break_images(root)
    strict = build_datamodule(root, SPLITS, image_size=32, min_word_count=1)
    with pytest.raises(ValueError, match=f"1 train images cannot be used: .*{missing.name}: file not found.*"
                                         "data.on_bad_image=skip"):
        strict.setup()
    nowhere = build_datamodule(root, {**SPLITS, "val": {**SPLITS["val"], "images": "elsewhere"}}, min_word_count=1,
                                on_bad_image="skip")
    with pytest.raises(FileNotFoundError, match="none of the 10 val images exists.*data.splits.val.images"):
        nowhere.setup()

    lenient = build_datamodule(root, SPLITS, image_size=32, min_word_count=1, batch_size=4, on_bad_image="skip")
    with caplog.at_level("WARNING"):
        lenient.setup()
        batches = list(lenient.train_dataloader())
    assert f"skipped train image {missing}: file not found" in caplog.text
    assert "train: skipped 1 of 48 images" in caplog.text
    assert f"skipped image {truncated}: cannot decode" in caplog.text  # found when decoded, logged once
    seen = torch.cat([b.image_ids for b in batches if b is not None])
    assert len(seen) == TINY_SHAPES.num_train - 2 and len(set(seen.tolist())) == len(seen)

    lenient._datasets["train"].skip_bad_images = False
    index = [i.path for i in lenient._datasets["train"].images].index(truncated)
    failed = lenient._datasets["train"][index]  # raised in the main process, not inside a DataLoader worker
    good = next(item for item in map(lenient._datasets["train"].__getitem__, range(4))
                if item is not None and not isinstance(item, BadImageError))
    assert isinstance(failed, BadImageError) and collate_captions([good, failed]) is failed
    sent = pickle.loads(pickle.dumps(failed))  # as a worker process hands it over
    assert (type(sent), sent.path, sent.reason, str(sent)) == (BadImageError, truncated, "unreadable", str(failed))
    with pytest.raises(BadImageError, match=f"{truncated.name}: cannot decode.*data.on_bad_image=skip"):
        lenient.on_before_batch_transfer(failed, 0)
    # the same from a real worker process: the error keeps its type and one-line message
    lenient.num_workers = 1
    with pytest.raises(BadImageError, match=f"^{re.escape(str(truncated))}: cannot decode[^\n]*skip trains without it"
                                            r"\)$"):
        for batch in lenient.train_dataloader():
            lenient.on_before_batch_transfer(batch, 0)


def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 50000, 50000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    for check in (probe_image, open_rgb):
        with pytest.raises(BadImageError, match="2500000000 pixels.*decompression bomb") as error:
            check(path)
        assert error.value.reason == "too_large"


def test_training_from_the_image_cache_gives_the_same_batches(shared_data: Path, tmp_path: Path) -> None:
    mini = shared_data / "coco-val2017-mini"
    splits = {s: {"annotations": "annotations/captions_mini.json", "images": "val2017"}
              for s in ("train", "val", "test")}
    settings = {"image_size": 48, "min_word_count": 1, "batch_size": 16}
    decoded = build_datamodule(mini, splits, **settings)
    cached = build_datamodule(mini, splits, image_cache=True, image_cache_dir=tmp_path / "cache", **settings)
    decoded.setup()
    cached.setup()
    assert len(list((tmp_path / "cache").iterdir())) >= 1
    for ours, theirs in zip(cached.val_dataloader(), decoded.val_dataloader(), strict=True):
        assert torch.equal(ours.image_ids, theirs.image_ids)
        assert torch.equal(ours.images, theirs.images)  # bit-identical pixels
        assert torch.equal(ours.tokens, theirs.tokens)


def test_a_failed_image_batch_raises_in_the_modules_steps_and_passes_lightnings_input_conversion() -> None:
    """Without the data module's hook (a loader handed to the Trainer) the steps raise it themselves; Lightning's
    precision plugins convert a batch before any hook, and leave the error as it is."""
    from lightning_utilities.core.apply_func import apply_to_collection

    from captioning.models.decoders import ShowAttendTellDecoder
    from captioning.models.encoder_decoder import target_of
    from captioning.models.encoders import PrecomputedEncoder
    from captioning.module import CaptioningLitModule

    module = CaptioningLitModule(["<pad>", "<bos>", "<eos>", "<unk>", "a"],
                                 {"_target_": target_of(PrecomputedEncoder), "feature_dim": 8},
                                 {"_target_": target_of(ShowAttendTellDecoder), "embed_dim": 8, "hidden_size": 8,
                                  "attention_dim": 4})
    failed = BadImageError(Path("photos/cut.jpg"), "unreadable", "cannot decode: image file is truncated")
    assert apply_to_collection(failed, torch.Tensor, lambda tensor: tensor.double()) is failed
    for step in (module.training_step, module.validation_step, module.test_step, module.predict_step):
        with pytest.raises(BadImageError, match="^photos/cut.jpg: cannot decode: image file is truncated$"):
            step(failed, 0)
