"""The ``caption`` command and ``Captioner`` API: a checkpoint alone captions a folder of images."""

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.caption import Captioner, expand_inputs, main, parse_args
from captioning.models.decoders import UpDownDecoder
from captioning.models.encoder_decoder import target_of
from captioning.models.encoders import PrecomputedEncoder
from captioning.module import CaptioningLitModule
from tests.conftest import PROJECT_ROOT
from tests.test_train import QUICK, _config
import train


@pytest.fixture(scope="module")
def attention_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """A tiny Show-Attend-Tell model trained for a few steps on the tiny shapes data."""
    output = tmp_path_factory.mktemp("sat")
    train.run(_config(output, tiny_shapes.parent, [*QUICK, "test=false"]))
    return output / "checkpoints" / "last.ckpt"


def _images_with_a_corrupt_one(tiny_shapes: Path, folder: Path) -> list[Path]:
    folder.mkdir()
    sources = sorted((tiny_shapes / "images" / "test").iterdir())[:5]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image at all")
    return sorted(folder.iterdir())


@pytest.mark.slow
def test_caption_cli_writes_json_in_input_order_and_reports_bad_files(attention_checkpoint: Path, tiny_shapes: Path,
                                                                      tmp_path: Path) -> None:
    files = _images_with_a_corrupt_one(tiny_shapes, tmp_path / "photos")
    output, maps = tmp_path / "captions.json", tmp_path / "maps"
    completed = subprocess.run(
        ["caption", str(tmp_path / "photos"), str(files[0]), "--checkpoint", str(attention_checkpoint),
         "--format", "json", "--output", str(output), "--attention-maps", str(maps), "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert completed.returncode == 1  # one file could not be read
    assert "broken.png" in completed.stderr and "1 of 6 images could not be read" in completed.stderr
    results = json.loads(output.read_text())
    good = [str(f) for f in files if f.name != "broken.png"]
    assert [r["file"] for r in results] == good  # input order, each file once, the bad one left out
    assert all(isinstance(r["caption"], str) and r["caption"] and r["log_prob"] <= 0 for r in results)
    pngs = sorted(maps.glob("*.png"))
    assert len(pngs) == len(good) and all(Image.open(p).size[0] > 100 for p in pngs)

    api = Captioner.from_checkpoint(attention_checkpoint, device="cpu").caption(good, batch_size=3)
    assert [(r.file, r.caption) for r in api] == [(r["file"], r["caption"]) for r in results]
    assert all(r.attention.shape == (len(r.words), 4, 4) for r in api)


@pytest.mark.slow
def test_caption_captions_every_real_photo_in_a_folder(attention_checkpoint: Path, shared_data: Path,
                                                       tmp_path: Path) -> None:
    folder = shared_data / "coco-val2017-mini" / "val2017"
    output = tmp_path / "captions.json"
    assert main([str(folder), "--checkpoint", str(attention_checkpoint), "--format", "json", "--output", str(output),
                 "--beam-size", "1", "--batch-size", "50"]) == 0
    results = json.loads(output.read_text())
    photos = sorted(str(p) for p in folder.glob("*.jpg"))
    assert [r["file"] for r in results] == photos  # one entry per photo, the grayscale one included
    assert all(r["caption"] for r in results)


@pytest.mark.slow
def test_caption_n_best_lists_each_images_best_captions(attention_checkpoint: Path, tiny_shapes: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos = sorted((tiny_shapes / "images" / "test").iterdir())[:3]
    files = [str(p) for p in photos]
    output = tmp_path / "captions.json"
    assert main([*files, "--checkpoint", str(attention_checkpoint), "--beam-size", "4", "--n-best", "3",
                 "--format", "json", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert [r["file"] for r in results] == files
    for result in results:
        assert len(result["n_best"]) == 3
        assert result["n_best"][0] == {"caption": result["caption"], "log_prob": result["log_prob"]}
        log_probs = [entry["log_prob"] for entry in result["n_best"]]
        assert all(p <= 0 for p in log_probs) and log_probs == sorted(log_probs, reverse=True)  # no length penalty
    top = main([*files, "--checkpoint", str(attention_checkpoint), "--beam-size", "4", "--format", "json",
                "--output", str(tmp_path / "top.json")])
    assert top == 0 and json.loads((tmp_path / "top.json").read_text()) == [
        {key: r[key] for key in ("file", "caption", "log_prob")} for r in results]

    capsys.readouterr()
    assert main([*files, "--checkpoint", str(attention_checkpoint), "--beam-size", "4", "--n-best", "3"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(file, float(log_prob), caption) for file, log_prob, caption in lines] == [
        (r["file"], pytest.approx(e["log_prob"], abs=1e-4), e["caption"]) for r in results for e in r["n_best"]]

    assert main([files[0], "--checkpoint", str(attention_checkpoint), "--beam-size", "2", "--n-best", "3"]) == 2
    assert "--n-best must be between 1 and the beam size (2), got 3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("run_overrides", "flags"), [
    ([], []),  # no flag: the checkpoint's own decoding (greedy here), as its validation ran
    (["model.beam_size=3", "model.length_penalty=0.7"], ["--beam-size", "3", "--length-penalty", "0.7"]),
], ids=["greedy", "beam3-length_penalty0.7"])
def test_the_caption_cli_captions_as_validation_does(attention_checkpoint: Path, tiny_shapes: Path, tmp_path: Path,
                                                     run_overrides: list[str], flags: list[str]) -> None:
    """One generation path: for the same checkpoint, images and settings, the test run's captions are the CLI's."""
    train.run(_config(tmp_path / "eval", tiny_shapes.parent,
                      ["train=false", f"ckpt_path={attention_checkpoint}", *run_overrides]))
    written = json.loads((tmp_path / "eval" / "test_captions.json").read_text())
    evaluated = {r["image_id"]: r["caption"] for r in written}
    images = json.loads((tiny_shapes / "annotations" / "captions_test.json").read_text())["images"]
    files = {image["id"]: str(tiny_shapes / "images" / "test" / image["file_name"]) for image in images}
    assert sorted(evaluated) == sorted(files)  # every test image
    output = tmp_path / "captions.json"
    assert main([*files.values(), "--checkpoint", str(attention_checkpoint), *flags, "--format", "json",
                 "--output", str(output), "--batch-size", "5"]) == 0
    captioned = {r["file"]: r["caption"] for r in json.loads(output.read_text())}
    assert {files[image_id]: caption for image_id, caption in evaluated.items()} == captioned


def test_inputs_expand_folders_and_globs_in_order_without_duplicates(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.JPG").write_bytes(b"")
    assert expand_inputs([str(tmp_path / "b.jpg"), str(tmp_path), str(tmp_path / "*.png")]) == [
        tmp_path / "b.jpg", tmp_path / "a.png", tmp_path / "sub" / "c.JPG"]


def test_inputs_keep_what_is_named_like_an_image_but_is_not_a_file(tmp_path: Path) -> None:
    """A FIFO (or a device, a broken link) is kept, so that reading it names it as skipped instead of it vanishing."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "folder.jpg").mkdir()
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "gone.png", tmp_path / "pipe.jpg"]
    assert expand_inputs([str(tmp_path / "*")]) == [tmp_path / "gone.png", tmp_path / "pipe.jpg"]


@pytest.mark.slow
def test_a_fifo_is_reported_and_a_failed_attention_map_loses_no_caption(attention_checkpoint: Path, tiny_shapes: Path,
                                                                        tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted((tiny_shapes / "images" / "test").iterdir())[:3]
    for source in sources:
        (photos / source.name).write_bytes(source.read_bytes())
    os.mkfifo(photos / "pipe.jpg")  # sorted last; opening it would block forever
    maps = tmp_path / "maps"
    (maps / f"00002_{sources[1].stem}.png").mkdir(parents=True)  # the second figure cannot replace a folder
    output = tmp_path / "captions.json"
    status = main([str(photos), "--checkpoint", str(attention_checkpoint), "--device", "cpu", "--format", "json",
                   "--output", str(output), "--attention-maps", str(maps)])
    error = capsys.readouterr().err
    assert status == 1, error
    assert f"skipped {photos / 'pipe.jpg'}: a FIFO (named pipe), not a regular file" in error
    assert "1 of 4 images could not be read" in error
    assert f"could not write the attention map of {photos / sources[1].name}" in error
    assert "the attention maps of 1 images could not be written (their captions were)" in error
    assert [r["file"] for r in json.loads(output.read_text())] == [str(photos / s.name) for s in sources]
    assert len([p for p in maps.glob("*.png") if p.is_file()]) == 2


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    completed = subprocess.run([sys.executable, "-m", "captioning.caption", str(tmp_path / "a.jpg"),
                                "--checkpoint", str(tmp_path / "nope.ckpt")], capture_output=True, text=True)
    assert completed.returncode == 2 and "nope.ckpt does not exist" in completed.stderr


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-length", "0"),
                                             ("--beam-size", "0"), ("--n-best", "x")])
def test_a_flag_out_of_range_is_named_before_anything_loads(flag: str, value: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(["a.jpg", "--checkpoint", "missing.ckpt", flag, value])
    assert stopped.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_a_model_of_precomputed_region_features_is_refused_for_image_files(tmp_path: Path) -> None:
    module = CaptioningLitModule(["<pad>", "<bos>", "<eos>", "<unk>", "a"],
                                 {"_target_": target_of(PrecomputedEncoder), "feature_dim": 8},
                                 {"_target_": target_of(UpDownDecoder), "embed_dim": 8, "hidden_size": 8,
                                  "attention_dim": 4})
    checkpoint = tmp_path / "updown.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, checkpoint)
    with pytest.raises(ValueError, match="model of precomputed region features .* cannot caption image files"):
        Captioner.from_checkpoint(checkpoint, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["text", "csv", "json"])
def test_a_file_name_that_is_not_utf8_loses_no_output(attention_checkpoint: Path, tiny_shapes: Path, tmp_path: Path,
                                                      output_format: str) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted((tiny_shapes / "images" / "test").iterdir())[0]
    raw_name = b"caf\xe9.png"  # Latin-1, as old cameras and archives name files
    (folder / os.fsdecode(raw_name)).write_bytes(source.read_bytes())
    (folder / "plain.png").write_bytes(source.read_bytes())
    output = tmp_path / "captions.out"
    output.write_text("the previous captions\n")
    assert main([str(folder), "--checkpoint", str(attention_checkpoint), "--format", output_format,
                 "--output", str(output)]) == 0
    written = output.read_bytes()
    if output_format == "json":
        files = [os.fsencode(entry["file"]) for entry in json.loads(written)]
        assert files == [os.fsencode(folder) + b"/" + raw_name, os.fsencode(folder / "plain.png")]
    else:
        assert os.fsencode(folder) + b"/" + raw_name in written and b"plain.png" in written
    assert not list(tmp_path.glob("*.partial"))  # no temporary file left (the lock file stays, by design)


@pytest.mark.slow
def test_two_caption_processes_on_one_output_never_interleave(attention_checkpoint: Path, tiny_shapes: Path,
                                                              tmp_path: Path) -> None:
    """The first run holds the output; a second one, started meanwhile, stops at once (exit 2) and says why."""
    images = sorted((tiny_shapes / "images" / "test").iterdir())[:4]
    output = tmp_path / "captions.json"
    command = [sys.executable, "-m", "captioning.cli", "caption", *map(str, images), "--checkpoint",
               str(attention_checkpoint), "--format", "json", "--output", str(output)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    lock_file = tmp_path / f".{output.name}.lock"
    try:
        deadline = time.monotonic() + 120
        while not _held(lock_file):  # wait until the first run has claimed the output ...
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # ... and keep it there while the second one starts
        second = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and f"another process is writing --output {output}" in second.stderr
    assert first.returncode == 0, err
    assert [entry["file"] for entry in json.loads(output.read_text())] == list(map(str, images))


def _held(lock_file: Path) -> bool:
    """Whether another process holds ``lock_file``'s lock (taking and releasing it if not)."""
    if not lock_file.exists():
        return False
    with open(lock_file) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.mark.parametrize(("encoding", "expected"), [("utf-8", b"caf\xe9.png\ta cat\n"),
                                                    ("ascii", b"caf\\udce9.png\ta cat \\xe9\n")])
def test_standard_output_takes_file_names_that_are_not_utf8(monkeypatch, encoding: str, expected: bytes) -> None:
    from captioning.caption import _write_results

    stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    monkeypatch.setattr(sys, "stdout", stream)
    extra = " \xe9" if encoding == "ascii" else ""  # a character the terminal's encoding lacks: all escaped
    _write_results(f"{os.fsdecode(b'caf' + bytes([0xe9]) + b'.png')}\ta cat{extra}\n", None)
    stream.flush()
    assert stream.buffer.getvalue() == expected
