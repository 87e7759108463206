import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.data.datasets import load_annotations
from captioning.data.image_cache import ImageCache
from captioning.data.prepare import main
from captioning.data.vocab import SPECIAL_TOKENS
from tests.conftest import PROJECT_ROOT

GOOD_CAPTIONS = ("a red square next to a blue circle", "two shapes on a white background",
                 "a small square and a circle")
# file planted -> the kind of finding it must be reported as
PLANTED = {
    "missing.jpg": "missing",
    "truncated.jpg": "unreadable",
    "zero.jpg": "unreadable",
    "text.jpg": "unreadable",
    "huge.png": "too_large",
    "rgba.png": "RGBA",
    "cmyk.jpg": "CMYK",
    "deep.png": "16-bit",
    "gray.jpg": "grayscale",
    "punctuation.jpg": "punctuation_caption",
    "empty_caption.jpg": "empty_caption",
    "blank_caption.jpg": "empty_caption",
}
ERROR_KINDS = {"missing", "unreadable", "too_large", "empty_caption"}


def _huge_png() -> bytes:
    """A real 1x1 PNG whose IHDR claims 50000x50000 (CRC fixed): only the header can refuse it."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    struct.pack_into(">II", png, 16, 50_000, 50_000)  # after the signature (8), length (4) and b"IHDR" (4)
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _write_dataset(root: Path, clean: bool = False) -> tuple[Path, Path]:
    """A COCO-format dataset under ``root``: good images plus (unless ``clean``) every planted problem."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"good{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(images / "gray.jpg")
    files = [f"good{i}.jpg" for i in range(3)] + ["gray.jpg"]
    captions = {name: list(GOOD_CAPTIONS) for name in files}
    if not clean:
        data = (images / "good0.jpg").read_bytes()
        (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
        (images / "zero.jpg").write_bytes(b"")
        (images / "text.jpg").write_text("this is a text file, not a JPEG\n")
        (images / "huge.png").write_bytes(_huge_png())
        Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)).save(images / "rgba.png")
        Image.new("CMYK", (30, 20), (0, 128, 255, 10)).save(images / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.uint16)).save(images / "deep.png")
        for name in ("punctuation.jpg", "empty_caption.jpg", "blank_caption.jpg"):
            (images / name).write_bytes(data)
        files += ["truncated.jpg", "zero.jpg", "text.jpg", "huge.png", "rgba.png", "cmyk.jpg", "deep.png",
                  "missing.jpg", "punctuation.jpg", "empty_caption.jpg", "blank_caption.jpg"]
        for name in files[4:]:
            captions[name] = list(GOOD_CAPTIONS)
        captions["punctuation.jpg"].append(" ... , ")
        captions["empty_caption.jpg"].append("")
        captions["blank_caption.jpg"].append(" \t ")
    coco = {"images": [{"id": 100 + i, "file_name": name} for i, name in enumerate(files)],
            "annotations": [{"id": n, "image_id": 100 + i, "caption": caption}
                            for i, name in enumerate(files) for n, caption in enumerate(captions[name])]}
    annotations = root / "captions.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[Path, Path]:
    return _write_dataset(tmp_path / "planted")


def _arguments(annotations: Path, images: Path, *extra: str) -> list[str]:
    return ["--format", "coco", "--annotations", str(annotations), "--images", str(images), "--no-progress", *extra]


def _assert_every_problem_listed(output: str, images: Path) -> None:
    for name, kind in PLANTED.items():
        assert f"  {kind}: {images / name} " in output, (name, kind)


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_check_only_reports_every_planted_problem_and_writes_nothing(planted, tmp_path: Path, capsys) -> None:
    annotations, images = planted
    before = _tree(tmp_path)
    assert main(_arguments(annotations, images, "--check-only", "--output", str(tmp_path / "out"))) == 1
    output = capsys.readouterr().out
    _assert_every_problem_listed(output, images)
    for name in ("good0.jpg", "good1.jpg", "good2.jpg"):
        assert str(images / name) not in output
    assert "7 error(s); exit status 1" in output  # 1 missing, 3 unreadable, 1 too large, 2 empty captions
    assert _tree(tmp_path) == before


def test_the_module_runs_as_a_command(planted) -> None:
    annotations, images = planted
    result = subprocess.run([sys.executable, "-m", "captioning.data.prepare",
                             *_arguments(annotations, images, "--check-only")],
                            check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 1, result.stderr
    _assert_every_problem_listed(result.stdout, images)


def test_a_clean_dataset_passes(tmp_path: Path, capsys) -> None:
    annotations, images = _write_dataset(tmp_path / "clean", clean=True)
    assert main(_arguments(annotations, images, "--check-only")) == 0
    output = capsys.readouterr().out
    assert f"  grayscale: {images / 'gray.jpg'} " in output  # conversions are listed, not errors
    assert "no errors; exit status 0" in output


def test_output_holds_the_full_report_the_vocabulary_and_the_image_cache(planted, tmp_path: Path) -> None:
    annotations, images = planted
    out = tmp_path / "out"
    arguments = _arguments(annotations, images, "--output", str(out), "--image-cache", str(out / "cache"),
                           "--image-size", "32",
                           "--min-word-count", "2", "--show", "1")
    assert main(arguments) == 1
    report = json.loads((out / "report.json").read_text())
    listed = {Path(f["file"]).name: kind for group in ("errors", "warnings", "conversions")
              for kind, findings in report[group].items() for f in findings}
    assert listed == PLANTED
    assert set(report["errors"]) == ERROR_KINDS
    assert report["counts"]["images"] == 15 and report["counts"]["found"] == 14
    assert report["counts"]["converted"] == {"grayscale": 1, "CMYK": 1, "RGBA": 1, "16-bit": 1}
    assert report["exit_status"] == 1

    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["tokens"][:4] == list(SPECIAL_TOKENS) and "square" in vocab["tokens"]
    assert vocab["min_count"] == 2 and len(vocab["tokens"]) == report["vocabulary"]["size"]

    dataset = load_annotations("coco", annotations, images)
    cache = ImageCache.open(out / "cache", 32, dataset)
    assert len(cache) == 15 - 5  # missing, 3 unreadable, too large
    assert {b.image_id for b in cache.bad.values()} == {
        i.image_id for i in dataset if PLANTED.get(i.path.name) in ("missing", "unreadable", "too_large")}

    before = _tree(out)
    assert main(arguments) == 1  # a rerun finds everything up to date and rewrites nothing
    assert _tree(out) == before


def test_other_formats_are_checked_too(planted, tmp_path: Path, capsys) -> None:
    _, images = planted
    assert main(["--format", "images", "--images", str(images), "--check-only", "--no-progress"]) == 1
    output = capsys.readouterr().out
    assert f"  too_large: {images / 'huge.png'} " in output and "empty_caption" not in output
    table = tmp_path / "captions.jsonl"
    table.write_text("\n".join(json.dumps(row) for row in [
        {"file": "good0.jpg", "caption": "a square", "split": "train"},
        {"file": "good1.jpg", "caption": "  ", "split": "train"},
        {"file": "good2.jpg", "caption": "a circle", "split": "test"}]))
    assert main(["--format", "folder", "--annotations", str(table), "--images", str(images),
                 "--split", "train", "--check-only", "--no-progress"]) == 1
    output = capsys.readouterr().out
    assert f"  empty_caption: {images / 'good1.jpg'} " in output and "good2.jpg" not in output


@pytest.mark.parametrize("problem", ["not_utf8", "not_json", "repeated_id", "no_file", "no_folder"])
def test_unreadable_annotations_exit_2_naming_the_file(planted, problem: str, capsys) -> None:
    annotations, images = planted
    if problem == "not_utf8":
        annotations.write_bytes('{"images": [], "annotations": [{"caption": "caf\u00e9"}]}'.encode("latin-1"))
    elif problem == "not_json":
        annotations.write_text('{"images": [')
    elif problem == "repeated_id":
        annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                                           "annotations": []}))
    elif problem == "no_file":
        annotations = annotations.with_name("absent.json")
    else:
        images = images.with_name("absent")
    assert main(_arguments(annotations, images, "--check-only")) == 2
    error = capsys.readouterr().err
    assert str(images if problem == "no_folder" else annotations) in error.replace("\n", "")


@pytest.mark.parametrize("arguments", [
    ["--format", "coco", "--images", "x"],  # no annotations
    ["--format", "images", "--images", "x", "--annotations", "a.json"],
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--split", "train"],
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--image-cache", "--check-only"],
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--image-size", "0"],
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--image-size", "31"],  # config.LOWEST: 32
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--min-word-count", "nan"],
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--workers", "-1"],
    ["--format", "coco", "--annotations", "a.json", "--images", "x", "--images", "y"],  # a folder without its file
    ["--format", "tfrecord", "--annotations", "a.json", "--images", "x"],
])
def test_bad_arguments_exit_2(arguments: list[str], capsys) -> None:
    assert main(arguments) == 2
    assert "error" in capsys.readouterr().err


def test_the_shared_real_photos(shared_data: Path, tmp_path: Path, capsys) -> None:
    root = shared_data / "coco-val2017-mini"
    arguments = _arguments(root / "annotations" / "captions_mini.json", root / "val2017")
    assert main([*arguments, "--check-only"]) == 0
    output = capsys.readouterr().out
    assert f"  grayscale: {root / 'val2017' / '000000431848.jpg'} " in output
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 0
    counts = json.loads((tmp_path / "out" / "report.json").read_text())["counts"]
    assert counts["images"] == counts["found"] == counts["usable"] == 250
    assert counts["converted"] == {"grayscale": 1}
    assert counts["captions"] == 1250 and counts["empty_captions"] == counts["missing"] == 0


def test_the_shared_karpathy_split(shared_data: Path, capsys) -> None:
    root = shared_data / "coco-val2017-mini"
    assert main(["--format", "karpathy", "--annotations", str(root / "dataset_coco_mini.json"),
                 "--images", str(root), "--split", "val", "test", "--check-only", "--no-progress"]) == 0
    assert "no errors; exit status 0" in capsys.readouterr().out


def _coco_part(root: Path, name: str, first_id: int, count: int) -> None:
    """``root/name.json`` and ``root/name/``: ``count`` clean images with ids from ``first_id`` (as COCO's parts)."""
    (root / name).mkdir(parents=True)
    rng = np.random.default_rng(first_id)
    entries = [{"id": first_id + i, "file_name": f"{name}{i}.jpg"} for i in range(count)]
    for entry in entries:
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / name / entry["file_name"])
    (root / f"{name}.json").write_text(json.dumps({
        "images": entries,
        "annotations": [{"id": n, "image_id": e["id"], "caption": caption}
                        for e in entries for n, caption in enumerate(GOOD_CAPTIONS)]}))


@pytest.mark.parametrize("train_file", ["train.json", "fewer.json"])
def test_training_opens_the_cache_prepare_wrote_without_writing_another(tmp_path: Path, monkeypatch,
                                                                         train_file: str) -> None:
    """COCO-2017-like: train and val parts prepared in one run into training's default cache folder; training
    then reads the same images, or fewer (``fewer.json``: the cache of more images serves it)."""
    from captioning.data.build import build_datamodule
    from captioning.data.prepare import default_image_cache_dir

    root = tmp_path / "coco"
    _coco_part(root, "train", 1, 4)
    _coco_part(root, "val", 101, 2)
    train = json.loads((root / "train.json").read_text())
    (root / "fewer.json").write_text(json.dumps({"images": train["images"][:3], "annotations": [
        a for a in train["annotations"] if a["image_id"] in {i["id"] for i in train["images"][:3]}]}))
    monkeypatch.setenv("CAPTIONING_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["--format", "coco", "--annotations", str(root / "train.json"), "--images", str(root / "train"),
                 "--annotations", str(root / "val.json"), "--images", str(root / "val"),
                 "--image-cache", "--image-size", "32", "--no-progress"]) == 0
    cache_dir = default_image_cache_dir()
    assert cache_dir == tmp_path / "cache" / "images"
    written = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")}
    assert [p.name for p in cache_dir.iterdir() if p.is_dir()] and all(
        p.name.startswith("32px-") for p in cache_dir.iterdir() if p.is_dir())

    datamodule = build_datamodule(root, {"train": {"annotations": train_file, "images": "train"},
                                         "test": {"annotations": "val.json", "images": "val"}},
                                  val_from_train=1, image_size=32, batch_size=2, min_word_count=1,
                                  image_cache=True, image_cache_dir=cache_dir)
    datamodule.setup("fit")
    assert datamodule.source.cache.directory.parent == cache_dir
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")} == written  # nothing added or rewritten
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.images.shape[-2:] == (32, 32)


@pytest.mark.parametrize("cache_env", [None, "elsewhere"])
def test_the_default_cache_folder_is_trainings(tmp_path: Path, monkeypatch, cache_env: str | None) -> None:
    from hydra import compose, initialize_config_dir

    from captioning.data.prepare import TRAINING_IMAGE_SIZE, default_image_cache_dir

    monkeypatch.setenv("CAPTIONING_ROOT", str(tmp_path / "project"))
    if cache_env is None:
        monkeypatch.delenv("CAPTIONING_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("CAPTIONING_CACHE_DIR", str(tmp_path / cache_env))
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=coco2017"])
    assert Path(cfg.data.image_cache_dir) == default_image_cache_dir()
    assert cfg.data.image_size == TRAINING_IMAGE_SIZE  # prepare's default size is the one training opens
