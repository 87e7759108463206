import json
import shutil
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from captioning.data.batch import collate_captions
from captioning.data.datamodule import CaptionDataModule
from captioning.data.datasets import AnnotationError, load_coco_captions
from captioning.data.tokenize import tokenize
from captioning.data.vocab import SPECIAL_TOKENS, Vocabulary
from tests.conftest import TINY_SHAPES

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
    datamodule = CaptionDataModule(tiny_shapes, SPLITS, image_size=64, batch_size=4, min_word_count=1)
    datamodule.setup()
    dataset = datamodule._datasets["val"]
    batch = collate_captions([dataset[0], dataset[1]])
    assert batch.images.shape == (2, 3, 64, 64)
    assert batch.caption_image_index.tolist() == [0] * 5 + [1] * 5
    for row, length in enumerate(batch.lengths.tolist()):
        assert batch.tokens[row, 0] == datamodule.vocab.bos_id
        assert batch.tokens[row, length - 1] == datamodule.vocab.eos_id
        assert (batch.tokens[row, length:] == 0).all()
    references = datamodule.references("val")
    first = sorted(references)[0]
    decoded = [" ".join(datamodule.vocab.decode(t)) for t in batch.tokens[:5]]
    assert decoded == [" ".join(tokenize(c)) for c in references[first]]


def test_datamodule_visits_every_evaluation_image_once_and_builds_vocab_from_train(tiny_shapes: Path) -> None:
    datamodule = CaptionDataModule(tiny_shapes, SPLITS, image_size=64, batch_size=5, min_word_count=1)
    datamodule.setup()
    seen = torch.cat([b.image_ids for b in datamodule.val_dataloader()]).tolist()
    assert sorted(seen) == sorted(datamodule.references("val")) and len(seen) == TINY_SHAPES.num_val
    train_words = {w for captions in datamodule.references("train").values() for c in captions for w in tokenize(c)}
    assert set(datamodule.vocab.tokens[4:]) == train_words


def test_random_caption_sampling_draws_one_caption_per_image(tiny_shapes: Path) -> None:
    datamodule = CaptionDataModule(tiny_shapes, SPLITS, image_size=64, batch_size=6, min_word_count=1,
                                   train_captions_per_image="random")
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.tokens.shape[0] == 6 and batch.caption_image_index.tolist() == list(range(6))


def test_missing_split_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks \\['test'\\]"):
        CaptionDataModule(tmp_path, {k: v for k, v in SPLITS.items() if k != "test"})



def test_images_without_captions_are_skipped_and_counted(tiny_shapes: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tiny_shapes, root)
    annotation_file = root / "annotations" / "captions_val.json"
    data = json.loads(annotation_file.read_text())
    dropped = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped]
    annotation_file.write_text(json.dumps(data))
    datamodule = CaptionDataModule(root, SPLITS, image_size=64, min_word_count=1)
    with caplog.at_level("WARNING"):
        datamodule.setup()
    assert "skipped 1 images that have no caption" in caplog.text
    assert dropped not in datamodule.references("val")
    assert len(datamodule.references("val")) == TINY_SHAPES.num_val - 1
