"""Long silent phases show a progress bar on stderr: shapes generation, the image check, evaluation scoring."""

import json
from pathlib import Path

import pytest

from captioning.data.corpus import CaptionCorpus
from captioning.data.datasets import load_coco_references
from captioning.data.shapes import ShapesConfig, write_shapes_dataset
from captioning.evaluation import cli
from tests.conftest import TINY_SHAPES


def test_shapes_generation_counts_its_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = ShapesConfig(num_train=6, num_val=2, num_test=3, image_size=32, seed=1)
    write_shapes_dataset(tmp_path / "shapes", config)
    err = capsys.readouterr().err
    assert "generating the shapes dataset" in err and "11/11" in err
    write_shapes_dataset(tmp_path / "quiet", config, progress=False)
    assert capsys.readouterr().err == ""


def test_the_image_check_counts_each_splits_images(tiny_shapes: Path, capsys: pytest.CaptureFixture) -> None:
    splits = {split: {"annotations": f"annotations/captions_{split}.json", "images": f"images/{split}"}
              for split in ("train", "val", "test")}
    corpus = CaptionCorpus(tiny_shapes, splits, min_word_count=1)
    assert len(corpus.images["train"]) == TINY_SHAPES.num_train
    err = capsys.readouterr().err
    assert "checking the train images" in err and f"{TINY_SHAPES.num_train}/{TINY_SHAPES.num_train}" in err
    assert "checking the test images" in err and f"{TINY_SHAPES.num_test}/{TINY_SHAPES.num_test}" in err


@pytest.mark.slow
def test_the_evaluation_cli_shows_its_phases(tiny_shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotations = tiny_shapes / "annotations" / "captions_test.json"
    references = load_coco_references(annotations)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": i, "caption": captions[0]} for i, captions in references.items()]))
    assert cli.main([str(results), "--annotations", str(annotations), "--no-spice"]) == 0
    err = capsys.readouterr().err
    assert "scored" in err and "2/2" in err
