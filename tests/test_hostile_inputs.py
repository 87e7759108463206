"""Hostile and careless inputs: every one ends as a clear error naming its culprit, a counted skip, or
correct handling; never code run from a checkpoint, a NaN "best" checkpoint, or a shared run folder."""

import http.server
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from captioning.callbacks import NonFiniteGuard, NonFiniteTrainingError
from captioning.caption import Captioner, main as caption_main
from captioning.checkpoints import CheckpointError, CheckpointNotFoundError, load_checkpoint, load_data
from captioning.data.datasets import AnnotationError, load_annotations, load_image_folder, load_karpathy_split
from captioning.data.files import locked, write_json
from captioning.data.images import BadImageError, open_rgb, probe_image
from captioning.data.shapes import ensure_shapes_dataset, verify_shapes_dataset
from captioning.evaluation.cli import main as evaluation_main
from captioning.models.decoders import ShowTellDecoder
from captioning.models.encoder_decoder import target_of
from captioning.models.encoders import CNNEncoder
from captioning.module import CaptioningLitModule
from tests.conftest import PROJECT_ROOT, TINY_SHAPES
from tests.test_train import QUICK, TINY_OVERRIDES, TINY_SHAPES_OVERRIDES, _config
import train

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "circle"]


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do (here harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def _one_line(text: str) -> str:
    """stderr as one line: rich wraps long messages at the terminal width."""
    return " ".join(text.split())


# ---- the files: each maker writes one kind of bad checkpoint and returns its path ----

def _random_bytes(folder: Path) -> Path:
    path = folder / "random.ckpt"
    path.write_bytes(os.urandom(4096))
    return path


def _truncated(folder: Path) -> Path:
    whole = folder / "whole.ckpt"
    torch.save({"hyper_parameters": {"vocab": VOCAB}, "state_dict": {"w": torch.ones(64, 64)}}, whole)
    path = folder / "truncated.ckpt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.ckpt"
    path.write_bytes(b"")
    return path


def _plain_state_dict(folder: Path) -> Path:
    path = folder / "weights.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return path


def _directory(folder: Path) -> Path:
    path = folder / "checkpoints"
    path.mkdir()
    return path


def _missing(folder: Path) -> Path:
    return folder / "nowhere.ckpt"


def _pickle_with_code(folder: Path) -> Path:
    path = folder / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(folder / "PAYLOAD_RAN")}, protocol=2))
    return path


def _torch_zip_with_code(folder: Path) -> Path:
    path = folder / "evil_zip.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": _Payload(folder / "PAYLOAD_RAN")}, path)
    return path


BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "random_bytes": (_random_bytes, "is not a torch checkpoint file"),
    "truncated": (_truncated, "is truncated or damaged"),
    "empty": (_empty, "is empty (0 bytes)"),
    "plain_state_dict": (_plain_state_dict, "is a plain state_dict, not a captioning checkpoint"),
    "directory": (_directory, "is a directory, not a checkpoint file"),
    "missing": (_missing, "is not a file"),
    "pickle_with_code": (_pickle_with_code, "a checkpoint is data, never code (it asks for io.open)"),
    "torch_zip_with_code": (_torch_zip_with_code, "a checkpoint is data, never code (it asks for io.open)"),
}


def _assert_refused(message: str, path: Path, expected: str, folder: Path) -> None:
    message = _one_line(message)
    assert str(path) in message and expected in message, message
    assert "weights_only=False" not in message and "Traceback" not in message
    assert not (folder / "PAYLOAD_RAN").exists()  # the pickle's payload never ran


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_the_loader_names_the_file_and_what_is_wrong(tmp_path: Path, kind: str) -> None:
    make, expected = BAD_FILES[kind]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    _assert_refused(str(caught.value), path, expected, tmp_path)
    assert isinstance(caught.value, FileNotFoundError) == (kind == "missing")


def test_the_malicious_pickle_would_run_if_unpickled_fully(tmp_path: Path) -> None:
    """The control: the payload the other tests expect never to run does run under a plain pickle.load."""
    path = _pickle_with_code(tmp_path)
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", str(path)],
                   check=True, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert (tmp_path / "PAYLOAD_RAN").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/best.ckpt", "https://example.org/best.ckpt",
                                 "s3://bucket/best.ckpt", "hf://user/model/best.ckpt", "file:///tmp/best.ckpt"])
def test_a_url_is_refused_with_how_to_load_it(url: str) -> None:
    with pytest.raises(CheckpointError, match="is a URL: only local files are loaded.*download it first and pass "
                                              "the local path") as caught:
        load_checkpoint(url)
    assert url in str(caught.value)


@pytest.mark.parametrize("key", ["ckpt_path", "init_from"])
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_train_refuses_a_bad_checkpoint_before_preparing_data(tmp_path: Path, kind: str, key: str) -> None:
    make, expected = BAD_FILES[kind]
    path = make(tmp_path)
    overrides = [f"{key}={path}"] + (["train=false"] if key == "ckpt_path" else [])
    with pytest.raises(CheckpointError) as caught:
        train.run(_config(tmp_path / "run", tmp_path / "data", overrides))
    _assert_refused(str(caught.value), path, expected, tmp_path)
    assert f"{key}={path}" in str(caught.value)
    assert not (tmp_path / "data").exists()  # refused before the shapes data was generated


def _train_py(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("kind", "key"), [("random_bytes", "ckpt_path"), ("plain_state_dict", "ckpt_path"),
                                           ("truncated", "init_from"), ("directory", "init_from")])
def test_train_py_says_what_is_wrong_with_a_checkpoint_without_a_traceback(tmp_path: Path, kind: str,
                                                                           key: str) -> None:
    make, expected = BAD_FILES[kind]
    path = make(tmp_path)
    completed = _train_py(f"{key}={path}", *(["train=false"] if key == "ckpt_path" else []),
                          f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}")
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    _assert_refused(completed.stderr, path, expected, tmp_path)


class _PickleServer(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        type(self).requests.append(self.path)


@pytest.fixture
def pickle_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server serving a malicious checkpoint; yields its URL and the folder of the marker."""
    served = tmp_path / "served"
    served.mkdir()
    _torch_zip_with_code(served)
    handler = lambda *args, **kwargs: _PickleServer(*args, directory=str(served), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _PickleServer.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/evil_zip.ckpt", served
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_checkpoint_is_never_fetched_nor_run(tmp_path: Path, pickle_server: tuple[str, Path]) -> None:
    url, served = pickle_server
    completed = _train_py("train=false", f"ckpt_path={url}", f"hydra.run.dir={tmp_path / 'run'}",
                          f"paths.data_dir={tmp_path / 'data'}")
    message = _one_line(completed.stderr)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"ckpt_path={url} is a URL" in message and "download it first and pass the local path" in message
    assert "Traceback" not in completed.stderr
    assert not (served / "PAYLOAD_RAN").exists() and _PickleServer.requests == []  # not even downloaded

    assert caption_main([str(_an_image(tmp_path)), "--checkpoint", url]) == 2
    with pytest.raises(CheckpointError, match="is a URL"):
        Captioner.from_checkpoint(url)
    assert not (served / "PAYLOAD_RAN").exists() and _PickleServer.requests == []


def _an_image(folder: Path) -> Path:
    path = folder / "photo.jpg"
    path.write_bytes(b"")  # never opened: the checkpoint is refused first
    return path


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_caption_says_what_is_wrong_with_a_checkpoint(tmp_path: Path, kind: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = BAD_FILES[kind]
    path = make(tmp_path)
    assert caption_main([str(_an_image(tmp_path)), "--checkpoint", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("caption: ")
    _assert_refused(stderr, path, expected, tmp_path)


def test_the_caption_command_prints_no_traceback(tmp_path: Path) -> None:
    path = _random_bytes(tmp_path)
    completed = subprocess.run([sys.executable, "-m", "captioning.caption", str(_an_image(tmp_path)),
                                "--checkpoint", str(path)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert f"caption: checkpoint {path} is not a torch checkpoint file" in _one_line(completed.stderr)


def _diverged_checkpoint(folder: Path) -> Path:
    path = folder / "diverged.ckpt"
    state = {"net.encoder.weight": torch.ones(2, 2), "net.decoder.embedding.weight": torch.ones(6, 4),
             "net.decoder.output.weight": torch.tensor([[1.0, float("nan")]]),
             "net.decoder.output.bias": torch.tensor([float("inf")])}
    torch.save({"hyper_parameters": {"vocab": VOCAB, "encoder": {}, "decoder": {}}, "state_dict": state,
                "pytorch-lightning_version": pl.__version__, "optimizer_states": [], "loops": {}, "epoch": 0,
                "global_step": 1}, path)
    return path


def test_a_checkpoint_with_non_finite_weights_is_refused_everywhere(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = _diverged_checkpoint(tmp_path)
    expected = "has non-finite weights (2 of 4 tensors hold NaN or infinity, the first net.decoder.output.weight)"
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Captioner.from_checkpoint(path, device="cpu")
    assert caption_main([str(_an_image(tmp_path)), "--checkpoint", str(path)]) == 2
    assert f"caption: checkpoint {path} {expected}" in _one_line(capsys.readouterr().err)
    for key, overrides in (("ckpt_path", ["train=false"]), ("ckpt_path", []), ("init_from", [])):
        with pytest.raises(CheckpointError, match=f"{key}=.*diverged.ckpt has non-finite weights"):
            train.run(_config(tmp_path / "run", tmp_path / "data", [f"{key}={path}", *overrides]))


def test_resuming_needs_a_checkpoint_with_the_training_state(tmp_path: Path) -> None:
    path = tmp_path / "model_only.ckpt"
    torch.save({"hyper_parameters": {"vocab": VOCAB}, "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not what Lightning needs to resume training from it .*init_from="):
        train.run(_config(tmp_path / "run", tmp_path / "data", [f"ckpt_path={path}"]))
    with pytest.raises(CheckpointError, match="not what Lightning needs to evaluate it"):
        train.run(_config(tmp_path / "run", tmp_path / "data", ["train=false", f"ckpt_path={path}"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_metrics_files_are_strict_json(tmp_path: Path, value: float) -> None:
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match=rf"{path} is not written: \['test/CIDEr'\] \({value}\) is not a finite"):
        write_json(path, {"test/Bleu_4": 0.25, "test/CIDEr": value})
    assert not path.exists() and not list(tmp_path.iterdir())
    write_json(path, {"test/CIDEr": 1.5})
    assert json.loads(path.read_text()) == {"test/CIDEr": 1.5}
    assert train._strict_json({"test/CIDEr": 1.5, "test/loss": value}) == {"test/CIDEr": 1.5, "test/loss": None}


# ---- the non-finite guard on a toy model: stop before the optimizer applies a NaN, or skip it ----

class _Toy(pl.LightningModule):
    """A linear model whose loss is NaN at global step ``nan_at``; records its weights at each step's start."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.nan_at = nan_at
        self.weights_at: dict[int, torch.Tensor] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.weights_at[self.global_step] = self.layer.weight.detach().clone()
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step == self.nan_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=2)


def _toy_trainer(guard: NonFiniteGuard, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])


def test_a_nan_loss_stops_training_before_the_weights_change() -> None:
    model = _Toy(nan_at=2)
    expected = (r"training stopped at global step 2 \(epoch 0, batch 2\): the training loss is NaN or infinite.*"
                r"model\.optimizer\.lr \(here 0\.1\)")
    with pytest.raises(NonFiniteTrainingError, match=expected):
        _toy_trainer(NonFiniteGuard(), steps=5).fit(model)
    assert torch.equal(model.layer.weight, model.weights_at[2])  # the NaN step was never applied
    assert not torch.equal(model.weights_at[2], model.weights_at[1])  # (the finite steps were)


def test_a_nan_loss_step_is_skipped_and_counted_when_asked() -> None:
    model, guard = _Toy(nan_at=2), NonFiniteGuard(skip_nonfinite_steps=True)
    _toy_trainer(guard, steps=5).fit(model)
    assert guard.skipped == 1 and guard.state_dict() == {"skipped": 1}
    assert torch.equal(model.weights_at[3], model.weights_at[2])  # step 2 left the weights as they were ...
    assert not torch.equal(model.weights_at[4], model.weights_at[3])  # ... and training went on
    assert torch.isfinite(model.layer.weight).all()
    optimizer_state = model.trainer.optimizers[0].state[model.layer.weight]
    assert int(optimizer_state["step"]) == 4  # 5 steps, 1 skipped: Adam's state never saw the NaN one


@pytest.mark.slow
def test_a_huge_learning_rate_stops_in_the_first_epoch_without_a_best_checkpoint(tmp_path: Path,
                                                                                 tiny_shapes: Path) -> None:
    run_dir = tmp_path / "run"
    completed = _train_py(*TINY_SHAPES_OVERRIDES, *TINY_OVERRIDES, "trainer.max_epochs=1",
                          "trainer.num_sanity_val_steps=0", "model.optimizer.lr=1e30", "logger=csv",
                          f"paths.data_dir={tiny_shapes.parent}", f"paths.cache_dir={tmp_path / 'cache'}",
                          f"hydra.run.dir={run_dir}")
    message = _one_line(completed.stderr)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    assert "training stopped at global step" in message and "(epoch 0," in message
    assert "model.optimizer.lr (here 1e+30" in message and "NaN or infinite" in message
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "metrics.json").exists()


# ---- run folders: two runs started in the same second each get their own ----

FROZEN_CLOCK = """
import datetime, runpy, sys
import hydra.core.utils

class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5, 600000)

hydra.core.utils.datetime = Frozen  # Hydra's ${now:...} resolver: both runs see the very same instant
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path, tiny_shapes: Path) -> None:
    logs = tmp_path / "logs"
    processes = [subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLOCK, *TINY_SHAPES_OVERRIDES, *TINY_OVERRIDES, *QUICK, "test=false",
         "logger=csv", f"seed={seed}", f"paths.data_dir={tiny_shapes.parent}",
         f"paths.cache_dir={tmp_path / f'cache{seed}'}", f"paths.log_dir={logs}"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    runs = sorted((logs / "train" / "runs").iterdir())
    assert len(runs) == 2 and all(run.name.startswith("2030-01-02_03-04-05_") for run in runs)
    seeds = set()
    for run in runs:  # each folder complete, and all of it from one run
        overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
        seed = next(int(o.partition("=")[2]) for o in overrides if o.startswith("seed="))
        seeds.add(seed)
        assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == seed
        assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert "val/best_CIDEr" in json.loads((run / "metrics.json").read_text())
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert seeds == {1, 2}


def test_a_missing_checkpoint_stays_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(tmp_path / "nope.ckpt")


# ---- dataset files: image paths stay inside their folder, every row lands in a split ----

ESCAPES = {  # a path an annotation gives -> what the error says about it
    "../../../../etc/passwd": "leads out of it",
    "sub/../../outside.png": "leads out of it",
    "/etc/passwd": "is absolute",
    "": "names no file",
    "a\0b.png": "holds a NUL character",
}


def _annotation_file(folder: Path, format: str, file_name: str, split: str = "train") -> Path:
    """A one-image annotation file of ``format`` naming ``file_name`` (Karpathy: as ``filename``)."""
    if format == "coco":
        path = folder / "captions.json"
        write_json(path, {"images": [{"id": 1, "file_name": file_name}],
                          "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}]})
    elif format == "karpathy":
        path = folder / "dataset.json"
        write_json(path, {"images": [{"imgid": 0, "split": "train", "filename": "ok.png",
                                      "sentences": [{"raw": "a red square"}]},
                                     {"imgid": 1, "split": split, "filename": file_name,
                                      "sentences": [{"raw": "a blue circle"}]}]})
    else:
        path = folder / "captions.jsonl"
        rows = [{"file": "ok.png", "caption": "a red square", "split": "train"},
                {"file": file_name, "caption": "a blue circle", "split": split}]
        path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.mark.parametrize("format", ["coco", "karpathy", "folder"])
@pytest.mark.parametrize("file_name", sorted(ESCAPES))
def test_an_image_path_leaving_its_folder_is_an_annotation_error(tmp_path: Path, format: str, file_name: str) -> None:
    annotations = _annotation_file(tmp_path, format, file_name)
    field = {"coco": "file_name of images[0]", "karpathy": "filepath/filename of images[1]",
             "folder": "file of line 2"}[format]
    with pytest.raises(AnnotationError) as error:
        load_annotations(format, annotations, tmp_path / "images", known_splits=["train", "val", "test"])
    message = str(error.value)
    assert message.startswith(f"{annotations}: {field} ({file_name!r}) {ESCAPES[file_name]}")
    assert f"inside the image folder {tmp_path / 'images'}" in message


def test_a_karpathy_filepath_leaving_the_root_is_named(tmp_path: Path) -> None:
    annotations = tmp_path / "dataset.json"
    write_json(annotations, {"images": [{"cocoid": 7, "split": "test", "filepath": "../../secret", "filename": "a.jpg",
                                         "sentences": [{"raw": "a cat"}]}]})
    with pytest.raises(AnnotationError, match=r"filepath/filename of images\[0\] \('../../secret/a.jpg'\) leads out"):
        load_karpathy_split(annotations, tmp_path, ["train"])  # checked in every split, not only the ones read


def test_paths_that_stay_inside_and_links_the_dataset_owner_placed_are_accepted(tmp_path: Path) -> None:
    """Only the annotation's text is checked: ``..`` that stays inside is fine, and so is a link in the folder
    to another disk (whoever can write the folder chose it; images linked from elsewhere are common)."""
    from PIL import Image

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "image.png")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "linked.png").symlink_to(outside / "image.png")
    table = tmp_path / "captions.jsonl"
    table.write_text("\n".join(json.dumps({"file": name, "caption": "a cat", "split": "train"})
                               for name in ("sub/../linked.png", "linked.png")))
    loaded = load_annotations("folder", table, images, ["train"], known_splits=["train"])
    assert [image.path for image in loaded] == [images / "linked.png", images / "sub/../linked.png"]
    for image in loaded:
        probe_image(image.path)


@pytest.mark.parametrize("split", ["tarin", "Train", "validation", ""])
def test_a_karpathy_image_in_an_unknown_split_is_named_not_dropped(tmp_path: Path, split: str) -> None:
    annotations = _annotation_file(tmp_path, "karpathy", "b.png", split=split)
    expected = (rf"{annotations}: images\[1\] has split {split!r}, which is not a Karpathy split; "
                r"the splits are \['train', 'restval', 'val', 'test'\]")
    for splits in (None, ["train"], ["test"]):
        with pytest.raises(AnnotationError, match=expected):
            load_karpathy_split(annotations, tmp_path, splits)


# ---- files that are no regular file: named, never opened (a FIFO would block the reader forever) ----

def _fifo(folder: Path) -> Path:
    path = folder / "pipe.png"
    os.mkfifo(path)
    return path


def _folder(folder: Path) -> Path:
    path = folder / "folder.jpg"
    path.mkdir()
    return path


def _device(folder: Path) -> Path:
    path = folder / "null.png"
    path.symlink_to("/dev/null")  # a link is followed: what counts is what it points to
    return path


def _broken_link(folder: Path) -> Path:
    path = folder / "gone.png"
    path.symlink_to(folder / "nothing-here.png")
    return path


NOT_FILES = {"fifo": (_fifo, "unreadable", "a FIFO (named pipe), not a regular file"),
             "folder": (_folder, "unreadable", "a folder, not a regular file"),
             "device": (_device, "unreadable", "a device, not a regular file"),
             "broken_link": (_broken_link, "missing", "file not found")}


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("reader", [probe_image, open_rgb])
def test_what_is_no_regular_file_is_named_and_never_opened(tmp_path: Path, kind: str,
                                                           reader: Callable[[Path], object]) -> None:
    make, reason, detail = NOT_FILES[kind]
    path = make(tmp_path)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            reader(path)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    thread = threading.Thread(target=read, daemon=True)  # a reader blocked on a FIFO must not hang the suite
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"reading {path} blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], BadImageError), outcome
    assert (outcome[0].path, outcome[0].reason) == (path, reason)
    assert detail in str(outcome[0]) and str(outcome[0]).startswith(str(path))


def test_an_image_folder_leaves_out_what_is_no_regular_file_with_a_warning(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    image = _an_image(tmp_path)
    for make, _, _ in NOT_FILES.values():
        make(tmp_path)
    with caplog.at_level("WARNING"):
        loaded = load_image_folder(tmp_path)
    assert [entry.path for entry in loaded] == [image]
    assert "skipped 4 entries" in caplog.text and "pipe.png" in caplog.text and "folder.jpg" in caplog.text


# ---- train.py on a folder dataset with hostile rows: exit 2 naming the culprit, or a counted skip ----

def _folder_dataset(folder: Path, hostile: dict[str, str] | None = None, extra: Callable[[Path], Path] | None = None
                    ) -> list[str]:
    """A small folder dataset (8 images, a few per split) plus one ``hostile`` row and/or an ``extra`` file
    in the images folder (its own row, in train); the overrides that train on it for one quick step."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for index, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
        Image.new("RGB", (64, 64), (30 * index, 100, 200 - 20 * index)).save(images / f"{index}.png")
        rows += [{"file": f"{index}.png", "caption": caption, "split": split}
                 for caption in ("a red square", "a blue circle on the left")]
    if extra is not None:
        rows.append({"file": extra(images).name, "caption": "a green triangle", "split": "train"})
    if hostile is not None:
        rows.append(hostile)
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return ["data=folder", f"paths.data_dir={folder}", "data.image_size=64", "data.num_workers=0",
            "data.batch_size=4", "data.min_word_count=1", "trainer.accelerator=cpu", *QUICK,
            "model.decoder.embed_dim=16", "model.decoder.hidden_size=32", "logger=csv", "test=false"]


@pytest.mark.slow
@pytest.mark.parametrize(("hostile", "expected"), [
    ({"file": "../../../../etc/passwd", "caption": "a cat", "split": "train"},
     "captions.jsonl: file of line 17 ('../../../../etc/passwd') leads out of it"),
    ({"file": "/etc/passwd", "caption": "a cat", "split": "train"},
     "captions.jsonl: file of line 17 ('/etc/passwd') is absolute"),
    ({"file": "0.png", "caption": "a cat", "split": "tarin"},
     "captions.jsonl: line 17 puts 0.png in split 'tarin', which no split of this run uses"),
])
def test_train_py_names_a_hostile_row_before_training(tmp_path: Path, hostile: dict[str, str], expected: str) -> None:
    run_dir = tmp_path / "run"
    completed = _train_py(*_folder_dataset(tmp_path / "data", hostile=hostile), f"hydra.run.dir={run_dir}",
                          f"paths.cache_dir={tmp_path / 'cache'}", timeout=300)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    assert expected in _one_line(completed.stderr)
    assert not list(run_dir.rglob("*.ckpt"))


@pytest.mark.slow
def test_train_py_names_a_fifo_in_a_folder_dataset_or_skips_it_counted(tmp_path: Path) -> None:
    overrides = _folder_dataset(tmp_path / "data", extra=_fifo)
    stopped = _train_py(*overrides, f"hydra.run.dir={tmp_path / 'error'}", f"paths.cache_dir={tmp_path / 'cache'}",
                        timeout=300)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    message = _one_line(stopped.stderr)
    assert "1 train images cannot be used" in message and "pipe.png: a FIFO (named pipe), not a regular file" in message
    skipped = _train_py(*overrides, "data.on_bad_image=skip", f"hydra.run.dir={tmp_path / 'skip'}",
                        f"paths.cache_dir={tmp_path / 'cache'}", timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "train: skipped 1 of 5 images that cannot be used" in skipped.stdout + skipped.stderr
    assert (tmp_path / "skip" / "checkpoints" / "last.ckpt").is_file()


# ---- what an interrupted generation left is cleaned on the next run, never a live writer's ----

def test_a_killed_shapes_generation_leaves_nothing_behind_the_next_run(tmp_path: Path, tiny_shapes: Path) -> None:
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, root)
    leftovers = [tmp_path / ".shapes.tmp-k1ll3d", tmp_path / ".shapes.stale-k1ll3d" / "shapes"]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "000001.png").write_bytes(b"half")
    unrelated = tmp_path / ".other.tmp-k1ll3d"
    unrelated.mkdir()
    lock = tmp_path / ".shapes.lock"
    done = threading.Event()
    with locked(lock):  # a live writer holds the lock: its staging folder must stay
        thread = threading.Thread(target=lambda: (ensure_shapes_dataset(root, TINY_SHAPES), done.set()), daemon=True)
        thread.start()
        assert not done.wait(timeout=1.0)
        assert all(leftover.exists() for leftover in leftovers)
    thread.join(timeout=60)
    assert done.is_set()
    assert not any(tmp_path.glob(".shapes.tmp-*")) and not any(tmp_path.glob(".shapes.stale-*"))
    assert unrelated.is_dir()  # another dataset's folder is not this generator's to remove
    assert verify_shapes_dataset(root, TINY_SHAPES)


# ---- an encoder weights file (model.encoder.weights_path) is read as data only, its errors in plain words ----

@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "empty", "pickle_with_code", "torch_zip_with_code"])
def test_an_encoder_weights_file_is_read_as_data_only_and_named(tmp_path: Path, kind: str) -> None:
    from captioning.models.encoders import CNNEncoder

    path = BAD_FILES[kind][0](tmp_path)
    with pytest.raises(ValueError) as caught:
        CNNEncoder("resnet18", weights_path=path)
    _assert_refused(str(caught.value), path, "cannot be read as a state dict of tensors", tmp_path)


def test_load_data_reads_a_plain_state_dict_but_never_code(tmp_path: Path) -> None:
    path = _pickle_with_code(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_data(path, "--weights")
    _assert_refused(str(caught.value), path, "a checkpoint is data, never code", tmp_path)
    weights = _plain_state_dict(tmp_path)
    assert load_data(weights, "--weights").keys() == {"weight", "bias"}  # a plain state dict is fine here


# ---- trainer=ddp's timeouts: out of range is named before anything loads ----

@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.strategy.peer_timeout_s=-1", "trainer.strategy.peer_timeout_s must be a number >= 0.0, got -1"),
    ("trainer.strategy.timeout.seconds=0", "trainer.strategy.timeout.seconds must be a number >= 1.0, got 0"),
])
def test_ddp_timeouts_out_of_range_are_named(tmp_path: Path, override: str, expected: str) -> None:
    from captioning.config import ConfigError, check_config

    cfg = _config(tmp_path, tmp_path / "data", ["trainer=ddp", override])
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_config(cfg)


# ---- a run folder that cannot be created is named before Hydra's traceback ----

@pytest.mark.parametrize("place", ["under_a_file", "under_proc"])
def test_an_unwritable_run_folder_is_named_in_one_line(tmp_path: Path, place: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    run_dir = tmp_path / "a_file" / "run" if place == "under_a_file" else Path("/proc/no-such-thing/run")
    completed = _train_py("trainer.accelerator=cpu", f"hydra.run.dir={run_dir}", timeout=120)
    message = _one_line(completed.stderr)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    assert f"hydra.run.dir={run_dir}: its folder {run_dir.parent}" in message
    assert ("is a file, not a folder" if place == "under_a_file" else "cannot be written") in message


def _small_checkpoint(folder: Path, edit: Callable[[dict], None] = lambda checkpoint: None) -> Path:
    """A tiny untrained model saved as train.py's checkpoints are (the module's own save hook), then edited."""
    module = CaptioningLitModule(VOCAB, {"_target_": target_of(CNNEncoder), "backbone": "resnet18", "weights": None},
                                 {"_target_": target_of(ShowTellDecoder), "embed_dim": 8, "hidden_size": 8},
                                 image_size=32)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    edit(checkpoint)
    path = folder / "edited.ckpt"
    torch.save(checkpoint, path)
    return path


def _swap_two_words(checkpoint: dict) -> None:
    vocab = checkpoint["hyper_parameters"]["vocab"]
    vocab[4], vocab[5] = vocab[5], vocab[4]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda checkpoint: checkpoint["hyper_parameters"].update(image_size=0),
     "hyper_parameters.image_size is 0, not a whole number >= 32"),
    (lambda checkpoint: checkpoint["hyper_parameters"].update(image_size="224"),
     "hyper_parameters.image_size is '224', not a whole number >= 32"),
    (_swap_two_words, "its vocabulary (hyper_parameters.vocab) is not the one its weights were trained with"),
    (lambda checkpoint: checkpoint["hyper_parameters"].pop("encoder"), "hyper_parameters.encoder is missing"),
    (lambda checkpoint: checkpoint["hyper_parameters"].update(vocab=5),
     "hyper_parameters.vocab is 5, not a list of strings"),
    (lambda checkpoint: checkpoint["hyper_parameters"].update(vocab=VOCAB[4:]),
     "hyper_parameters.vocab is refused: a vocabulary must start with the special tokens"),
    (lambda checkpoint: checkpoint["hyper_parameters"].update(vocab=[*VOCAB, "a"]),
     "hyper_parameters.vocab is refused: a vocabulary must not repeat a token"),
    (lambda checkpoint: checkpoint["hyper_parameters"].update(decoder=["ShowTellDecoder"]),
     "hyper_parameters.decoder is ['ShowTellDecoder'], not a mapping"),
    (lambda checkpoint: checkpoint["hyper_parameters"]["decoder"].update(hidden_size=16),
     "its model settings (hyper_parameters.encoder, hyper_parameters.decoder) do not rebuild its weights"),
    (lambda checkpoint: checkpoint["hyper_parameters"]["encoder"].update(_target_="os.system"),
     "do not rebuild its weights (model.encoder._target_ is 'os.system', which is not a known component"),
    (lambda checkpoint: checkpoint["hyper_parameters"].update(beam_size=0),
     "hyper_parameters: its decoding settings are refused (beam_size must be an integer >= 1, got 0)"),
], ids=["image_size_0", "image_size_text", "swapped_vocabulary", "no_encoder", "vocab_not_a_list",
        "vocab_without_special_tokens", "vocab_repeats_a_word", "decoder_not_a_mapping", "decoder_size_edited",
        "unknown_encoder_target", "beam_size_0"])
def test_an_edited_checkpoint_is_refused_by_caption(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   edit: Callable[[dict], None], expected: str) -> None:
    assert Captioner.from_checkpoint(_small_checkpoint(tmp_path), device="cpu").image_size == 32
    path = _small_checkpoint(tmp_path, edit)
    assert caption_main([str(_an_image(tmp_path)), "--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 2
    error = _one_line(capsys.readouterr().err)
    assert str(path) in error and expected in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["serve", "export"])
def test_an_edited_checkpoint_is_refused_by_serve_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            command: str) -> None:
    from captioning.export import main as export_main
    from captioning.serve.cli import main as serve_main

    path = _small_checkpoint(tmp_path, lambda checkpoint: checkpoint["hyper_parameters"].pop("encoder"))
    if command == "serve":
        assert serve_main(["--checkpoint", str(path), "--device", "cpu", "--port", "0"]) == 2
    else:
        assert export_main(["--checkpoint", str(path), "--output", str(tmp_path / "exported")]) == 2
        assert not (tmp_path / "exported").exists()
    error = _one_line(capsys.readouterr().err)
    assert f"checkpoint {path}: hyper_parameters.encoder is missing" in error and "Traceback" not in error


def test_an_evaluation_with_only_empty_references_names_the_image(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    annotations = tmp_path / "captions.json"
    write_json(annotations, {"images": [{"id": 1}, {"id": 2}],
                             "annotations": [{"id": 1, "image_id": 1, "caption": "a red circle ."},
                                             {"id": 2, "image_id": 2, "caption": " . "},
                                             {"id": 3, "image_id": 2, "caption": ""}]})
    results = tmp_path / "results.json"
    write_json(results, [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "a circle"}])
    output = tmp_path / "metrics.json"
    assert evaluation_main([str(results), "--annotations", str(annotations), "--no-spice",
                            "--output", str(output)]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "1 images have only empty reference captions" in error and "image id 2" in error
    assert not output.exists()


def _truncated_png(folder: Path) -> Path:
    """A PNG whose header reads (the corpus' probe passes it) but whose pixel data stops halfway."""
    from PIL import Image

    whole = folder / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    path = folder / "cut.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "worker-processes"])
def test_an_image_that_fails_only_when_decoded_mid_epoch_is_named_in_one_line(tmp_path: Path, workers: int) -> None:
    """Also from DataLoader worker processes (data=folder's default is 2), whose exceptions torch re-raises
    as a RuntimeError carrying the worker's traceback: the batch carries the failure to the main process."""
    overrides = _folder_dataset(tmp_path / "data", extra=_truncated_png)
    stopped = _train_py(*overrides, f"hydra.run.dir={tmp_path / 'error'}", f"paths.cache_dir={tmp_path / 'cache'}",
                        f"data.num_workers={workers}", timeout=300)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    message = _one_line(stopped.stderr)
    assert "cut.png" in message and "data.on_bad_image=skip trains without it" in message
