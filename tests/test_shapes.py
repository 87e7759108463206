import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from captioning.data.shapes import (
    COLOR_WORDS, MANIFEST_NAME, SHAPE_WORDS, SIZE_WORDS, ShapesConfig, ensure_shapes_dataset,
    verify_shapes_dataset,
)
from captioning.data.tokenize import tokenize
from tests.conftest import TINY_SHAPES

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SMALL = ShapesConfig(num_train=6, num_val=3, num_test=3, image_size=64, seed=11)


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _canonical(words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {synonym: canonical for canonical, synonyms in words.items() for synonym in synonyms}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    first = ensure_shapes_dataset(tmp_path / "a", SMALL)
    second = ensure_shapes_dataset(tmp_path / "b", SMALL)
    other = ensure_shapes_dataset(tmp_path / "c", replace(SMALL, seed=12))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 6 + 3 + 3 + 3 + 1
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    assert _manifest(first)["files"] != _manifest(other)["files"]


def test_every_caption_names_only_what_is_in_its_image(tiny_shapes: Path) -> None:
    shape_of, color_of, size_of = _canonical(SHAPE_WORDS), _canonical(COLOR_WORDS), _canonical(SIZE_WORDS)
    counted = 0
    for split in ("train", "val", "test"):
        coco = json.loads((tiny_shapes / "annotations" / f"captions_{split}.json").read_text())
        captions: dict[int, list[str]] = {}
        for annotation in coco["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        for image in coco["images"]:
            shapes = image["shapes"]
            assert 1 <= len(shapes) <= 3
            assert len(captions[image["id"]]) == 5 and len(set(captions[image["id"]])) == 5
            for caption in captions[image["id"]]:
                words = tokenize(caption)
                named_shapes = {shape_of[w] for w in words if w in shape_of}
                named_colors = {color_of[w] for w in words if w in color_of}
                assert named_shapes and named_shapes <= {s["shape"] for s in shapes}, caption
                assert named_colors and named_colors <= {s["color"] for s in shapes}, caption
                # each "size colour shape" phrase must describe one shape of the image
                for size, color, shape in re.findall(r"(\w+) (\w+) (\w+)", " ".join(words)):
                    if size in size_of and color in color_of and shape in shape_of:
                        assert {"size": size_of[size], "color": color_of[color], "shape": shape_of[shape]} in [
                            {k: s[k] for k in ("size", "color", "shape")} for s in shapes], caption
                counts = [n for n, word in COUNT_WORDS.items() if word in words]
                assert counts in ([], [len(shapes)]), caption
                counted += 1
    assert counted == 5 * (TINY_SHAPES.num_train + TINY_SHAPES.num_val + TINY_SHAPES.num_test)


def test_a_second_call_reuses_the_dataset(tmp_path: Path) -> None:
    root = ensure_shapes_dataset(tmp_path / "shapes", SMALL)
    image = root / "images" / "train" / "000001.png"
    before = image.stat().st_mtime_ns
    ensure_shapes_dataset(root, SMALL)
    assert image.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["alter_image", "delete_caption_file", "truncate_manifest", "other_config"])
def test_a_damaged_or_different_dataset_is_regenerated(tmp_path: Path, damage: str) -> None:
    root = ensure_shapes_dataset(tmp_path / "shapes", SMALL)
    expected = _manifest(root)
    config = SMALL
    if damage == "alter_image":
        (root / "images" / "val" / "000008.png").write_bytes(b"not a png")
    elif damage == "delete_caption_file":
        (root / "annotations" / "captions_test.json").unlink()
    elif damage == "truncate_manifest":
        (root / MANIFEST_NAME).write_text('{"generator_version": 1, "con')
    else:
        config = replace(SMALL, num_val=4)
    assert not verify_shapes_dataset(root, config)
    ensure_shapes_dataset(root, config)
    assert verify_shapes_dataset(root, config)
    if config == SMALL:
        assert _manifest(root) == expected


def test_a_folder_it_did_not_write_is_never_deleted(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    root.mkdir()
    (root / "my_notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not written by the shapes generator"):
        ensure_shapes_dataset(root, SMALL)
    assert (root / "my_notes.txt").read_text() == "precious"
