"""``captioning export`` and ``caption --onnx``: the exported graphs caption real photos as the checkpoint does."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model

from captioning.caption import Captioner
from captioning.caption import main as caption_main
from captioning.checkpoints import load_checkpoint, network_state
from captioning.data.files import locked
from captioning.export import GRAPH_FILES, SETTINGS_FILE, VOCAB_FILE, WEIGHTS_FILE
from captioning.export import main as export_main
from captioning.models.encoder_decoder import build_encoder_decoder
from captioning.onnx_runtime import onnx_captioner
from tests.test_caption import attention_checkpoint  # noqa: F401 (a fixture: a tiny trained attention model)
from tests.test_train import QUICK, _config
import train

PHOTOS = 40  # real photos captioned by both runtimes, per model and decoding


@pytest.fixture(scope="module")
def show_tell_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """A tiny Show-and-Tell model (LSTM, image beside every word: its first state is all zeros)."""
    output = tmp_path_factory.mktemp("show_tell")
    train.run(_config(output, tiny_shapes.parent, [*QUICK, "test=false", "model=show_tell"]))
    return output / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module", params=["show_attend_tell", "show_tell"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its export folder), written by the ``captioning export`` command."""
    checkpoint = request.getfixturevalue("attention_checkpoint" if request.param == "show_attend_tell"
                                         else "show_tell_checkpoint")
    folder = tmp_path_factory.mktemp("export") / request.param
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(folder)]) == 0
    return checkpoint, folder


def _captions(source: list[str], photos: list[Path], output: Path, *flags: str) -> list[dict]:
    assert caption_main([*map(str, photos), *source, "--format", "json", "--output", str(output),
                         "--batch-size", "16", *flags]) == 0
    return json.loads(output.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("decoding", [["--beam-size", "1"], ["--beam-size", "3", "--n-best", "3"]],
                         ids=["greedy", "beam"])
def test_onnx_captions_real_photos_as_the_checkpoint_does(exported: tuple[Path, Path], shared_data: Path,
                                                          tmp_path: Path, decoding: list[str]) -> None:
    checkpoint, folder = exported
    photos = sorted((shared_data / "coco-val2017-mini" / "val2017").glob("*.jpg"))[:PHOTOS]
    reference = _captions(["--checkpoint", str(checkpoint)], photos, tmp_path / "torch.json", *decoding)
    onnx = _captions(["--onnx", str(folder)], photos, tmp_path / "onnx.json", *decoding)
    assert [r["file"] for r in onnx] == [r["file"] for r in reference] == list(map(str, photos))
    assert [r["caption"] for r in onnx] == [r["caption"] for r in reference]
    assert [r["log_prob"] for r in onnx] == pytest.approx([r["log_prob"] for r in reference], abs=1e-3)
    if "--n-best" in decoding:  # near-tied lower ranks may swap between runtimes; their scores may not move
        for mine, theirs in zip(onnx, reference):
            assert len(mine["n_best"]) == 3
            assert [e["log_prob"] for e in mine["n_best"]] == pytest.approx(
                [e["log_prob"] for e in theirs["n_best"]], abs=1e-3)


@pytest.mark.slow
def test_onnx_attention_matches_the_checkpoints(exported: tuple[Path, Path], tiny_shapes: Path) -> None:
    checkpoint, folder = exported
    images = sorted((tiny_shapes / "images" / "test").iterdir())[:4]
    reference = Captioner.from_checkpoint(checkpoint, device="cpu", beam_size=2).caption(images)
    onnx = onnx_captioner(folder, beam_size=2).caption(images)
    for mine, theirs in zip(onnx, reference):
        assert mine.words == theirs.words
        if theirs.attention is None:  # Show and Tell attends to nothing: neither runtime invents maps
            assert mine.attention is None
        else:
            assert mine.attention.shape == theirs.attention.shape == (len(theirs.words), 4, 4)
            assert abs(mine.attention - theirs.attention).max() < 1e-4


@pytest.mark.slow
def test_export_folder_holds_settings_vocabulary_and_safetensors_weights(exported: tuple[Path, Path]) -> None:
    checkpoint, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted([*GRAPH_FILES.values(), SETTINGS_FILE, VOCAB_FILE,
                                                               WEIGHTS_FILE])
    hparams = load_checkpoint(checkpoint)["hyper_parameters"]
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    assert json.loads((folder / VOCAB_FILE).read_text()) == list(hparams["vocab"])
    assert settings["image_size"] == hparams["image_size"]
    assert settings["encoder"] == {**hparams["encoder"], "weights": None, "weights_path": None}  # weights: ours
    assert settings["decoder"] == dict(hparams["decoder"])
    assert settings["generation"]["beam_size"] == hparams["beam_size"]
    # the weights file rebuilds the network exactly, with no pickle involved
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as weights:
        assert weights.metadata()["source"] == checkpoint.name
    model = build_encoder_decoder(len(hparams["vocab"]), settings["encoder"], settings["decoder"])
    load_model(model, folder / WEIGHTS_FILE)
    expected = network_state(load_checkpoint(checkpoint))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_export_refuses_bad_inputs_and_keeps_other_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.ckpt"
    assert export_main(["--checkpoint", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err and not (tmp_path / "out").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert export_main(["--checkpoint", str(missing), "--output", str(mine)]) == 2
    assert "holds other files" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit) as stop:
        export_main(["--output", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--checkpoint" in capsys.readouterr().err


def test_caption_onnx_refuses_a_folder_that_is_no_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert caption_main([str(image), "--onnx", str(tmp_path)]) == 2
    assert "is not an export folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        caption_main([str(image), "--onnx", str(tmp_path), "--checkpoint", "x.ckpt"])
    assert stop.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_caption_onnx_refuses_a_reordered_vocabulary(exported: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    _, folder = exported
    assert onnx_captioner(folder).vocab.tokens == json.loads((folder / VOCAB_FILE).read_text())
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    tokens = json.loads((edited / VOCAB_FILE).read_text())
    tokens[4], tokens[5] = tokens[5], tokens[4]
    (edited / VOCAB_FILE).write_text(json.dumps(tokens))
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert caption_main([str(image), "--onnx", str(edited)]) == 2
    assert f"its vocabulary ({VOCAB_FILE}) is not the one its weights were trained with" in capsys.readouterr().err


@pytest.mark.parametrize("place", ["under_a_file", "unwritable", "dot", "held"])
def test_export_checks_its_output_before_reading_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture, place: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)  # "." is tmp_path, which holds a_file: no export to replace
    output, expected = {"under_a_file": (tmp_path / "a_file" / "exp", "a_file is a file, not a folder"),
                        "unwritable": (Path("/proc/nope/exp"), "cannot be written"),
                        "dot": (Path("."), f"--output {tmp_path} is a folder that holds other files"),
                        "held": (tmp_path / "exp", "another process is writing --output")}[place]
    with locked(tmp_path / ".exp.lock"):  # only "held" writes there: another export of the same folder
        assert export_main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(output)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "--output" in error and expected in error, error
    assert "missing.ckpt" not in error and "Traceback" not in error  # refused before the checkpoint is read


def _pop(field: str) -> Callable[[dict], None]:
    return lambda settings: settings.pop(field)


def _set(**fields: object) -> Callable[[dict], None]:
    return lambda settings: settings.update(fields)


@pytest.mark.parametrize(("edit", "expected"), [
    (_pop("generation"), "settings.json: generation is missing"),
    (_pop("prepared"), "settings.json: prepared is missing"),
    (_set(generation=[3]), "settings.json: generation is [3], not a mapping"),
    (_set(graphs={"init_state": {"outputs": "state_0"}}),
     "settings.json: graphs.init_state.outputs is 'state_0', not a list of strings"),
    (_set(image_size=0), "settings.json: image_size is 0, not a whole number >= 32"),
    (_set(image_size=96), "settings.json: image_size is 96, but encoder.onnx takes 64x64 images"),
    (lambda settings: settings["generation"].update(beam_size=0),
     "settings.json: generation: its decoding settings are refused (beam_size must be an integer >= 1, got 0)"),
    (lambda settings: settings.update(attention=not settings["attention"]),
     "settings.json (prepared, graphs, attention) names the outputs"),
], ids=["no_generation", "no_prepared", "generation_list", "state_names_text", "image_size_0", "image_size_96",
        "beam_size_0", "attention_flipped"])
def test_caption_onnx_names_an_edited_settings_field(exported: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture, edit: Callable[[dict], None],
                                                     expected: str) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(exported[1], edited)
    settings = json.loads((edited / SETTINGS_FILE).read_text())
    edit(settings)
    (edited / SETTINGS_FILE).write_text(json.dumps(settings))
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # never opened: the export is refused first
    assert caption_main([str(image), "--onnx", str(edited)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert f"--onnx {edited}: {expected}" in error and "Traceback" not in error, error
