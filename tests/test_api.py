"""The Python API: ``Captioner.caption`` on files and images in memory, and ``trainer.predict``."""

import io
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_tensor

from captioning.caption import Captioner, CaptionResult
from captioning.data.images import BadImageError, open_rgb
from captioning.data.transforms import build_image_transform
from captioning.data.vocab import Vocabulary
from captioning.models.encoder_decoder import build_encoder_decoder, target_of
from captioning.models.encoders import CNNEncoder
from captioning.module import CaptioningLitModule
from tests.test_train import QUICK, _config
import train

IMAGE_SIZE = 64


def untrained_captioner() -> Captioner:
    """A tiny model, not trained: its captions are nonsense, but each image's log-probability is its own."""
    torch.manual_seed(0)
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "blue", "circle", "square", "left"])
    encoder = {"_target_": target_of(CNNEncoder), "backbone": "resnet18", "weights": None, "trainable_stages": 0}
    decoder = {"_target_": "captioning.models.decoders.ShowTellDecoder", "embed_dim": 8, "hidden_size": 16}
    return Captioner(build_encoder_decoder(len(vocab), encoder, decoder), vocab, IMAGE_SIZE)


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return untrained_captioner()


def _photos(tiny_shapes: Path, count: int) -> list[Path]:
    return sorted((tiny_shapes / "images" / "test").iterdir())[:count]


def _key(result: CaptionResult) -> tuple[str, float]:
    return result.caption, result.log_prob


def test_every_kind_of_input_gets_the_caption_of_its_file_in_order(captioner: Captioner, tiny_shapes: Path) -> None:
    files = _photos(tiny_shapes, 6)
    expected = captioner.caption(files)
    assert len({r.log_prob for r in expected}) == len(files)  # each image told apart, so order shows
    pixels = [np.array(Image.open(f).convert("RGB")) for f in files]  # (H, W, 3) uint8
    inputs = [
        str(files[0]),  # a path as text
        Image.open(files[1]),  # a PIL image, not yet loaded
        pixels[2],  # a numpy array
        torch.from_numpy(pixels[3]).permute(2, 0, 1).contiguous(),  # (3, H, W) uint8 tensor
        to_tensor(pixels[4]),  # (3, H, W) floats in [0, 1]
        files[5].read_bytes(),  # an encoded file's bytes
    ]
    results = captioner.caption(inputs, batch_size=4)
    assert [_key(r) for r in results] == [_key(r) for r in expected]
    assert [r.file for r in results] == [str(files[0]), "<image 1>", "<image 2>", "<image 3>", "<image 4>",
                                         "<image 5>"]


def test_grayscale_array_is_captioned_as_its_grayscale_file(captioner: Captioner, tmp_path: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)  # (H, W)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    from_file, from_array, from_tensor = captioner.caption([tmp_path / "gray.png", gray,
                                                            torch.from_numpy(gray)[None]])
    assert _key(from_file) == _key(from_array) == _key(from_tensor)


@pytest.mark.parametrize(("bad", "message"), [
    (b"", "<image 1>: an empty file"),
    (b"GIF89a not really", "<image 1>: not an image PIL can identify"),
    (np.zeros((8, 8, 3), dtype=np.float32), "<image 1>: an array image must be uint8"),
    (np.zeros((8, 8, 4), dtype=np.uint8), r"<image 1>: an array image must be \(H, W, 3\) RGB or \(H, W\) grayscale"),
    (torch.full((3, 8, 8), 2.0), r"<image 1>: a floating-point tensor image must hold values in \[0, 1\]"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), r"<image 1>: a tensor image must be \(3, H, W\)"),
    (torch.zeros(3, 0, 8), r"<image 1>: a tensor image of shape \(3, 0, 8\) holds no pixels"),
    (torch.zeros(1, 8, 0, dtype=torch.uint8), r"<image 1>: a tensor image of shape \(1, 8, 0\) holds no pixels"),
])
def test_a_bad_image_in_memory_is_named_by_its_position(captioner: Captioner, tiny_shapes: Path, bad: object,
                                                        message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        captioner.caption([_photos(tiny_shapes, 1)[0], bad])


def test_a_missing_file_is_named_by_its_path(captioner: Captioner, tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match=f"{tmp_path / 'nowhere.jpg'}: file not found"):
        captioner.caption([np.zeros((8, 8, 3), dtype=np.uint8), tmp_path / "nowhere.jpg"])


def test_unsupported_types_raise_type_error_before_any_captioning(captioner: Captioner, tiny_shapes: Path) -> None:
    with pytest.raises(TypeError, match=r"image 1 is a builtins.list"):
        captioner.caption([_photos(tiny_shapes, 1)[0], [[0, 0, 0]]])
    with pytest.raises(TypeError, match=r"takes a list of images; for one image, pass \[image\]"):
        captioner.caption(str(_photos(tiny_shapes, 1)[0]))


def test_caption_files_yields_errors_in_place_for_the_cli(captioner: Captioner, tiny_shapes: Path,
                                                          tmp_path: Path) -> None:
    good = _photos(tiny_shapes, 2)
    outcomes = list(captioner.caption_files([good[0], tmp_path / "missing.png", good[1]], batch_size=2))
    assert isinstance(outcomes[1], BadImageError) and outcomes[1].reason == "missing"
    assert [o.file for o in (outcomes[0], outcomes[2])] == [str(good[0]), str(good[1])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> tuple[Path, Path]:
    """A tiny Show-Tell model trained for two steps with beam search 2: its checkpoint and output folder."""
    output = tmp_path_factory.mktemp("predict")
    train.run(_config(output, tiny_shapes.parent, [*QUICK, "test=false", "model.beam_size=2"]))
    return output / "checkpoints" / "last.ckpt", output


@pytest.mark.slow
def test_trainer_predict_gives_the_captioners_captions(trained: tuple[Path, Path], tiny_shapes: Path) -> None:
    checkpoint, output = trained
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    module = CaptioningLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    files = _photos(tiny_shapes, 5)
    transform = build_image_transform(module.hparams.image_size)
    pixels = torch.stack([transform(open_rgb(f)[0]) for f in files])  # (5, 3, s, s), upright as README shows
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    predicted = [r for batch in trainer.predict(module, DataLoader(pixels, batch_size=2)) for r in batch]
    expected = captioner.caption(files, batch_size=2)  # batched alike, so equal to the last bit
    assert [r.n_best for r in predicted] == [r.n_best for r in expected]
    assert predicted[2].file == "<batch 1 image 0>" and predicted[2].image_id is None

    # the project's own data loaders: results named by image id, the same captions as the files give
    datamodule = instantiate(_config(output, tiny_shapes.parent, QUICK).data)
    datamodule.prepare_data()
    datamodule.setup("predict")
    by_id = {r.image_id: r for batch in trainer.predict(module, datamodule.test_dataloader()) for r in batch}
    images = datamodule.corpus.images["test"]
    assert sorted(by_id) == sorted(image.image_id for image in images)
    assert all(r.file == f"<image id {image_id}>" for image_id, r in by_id.items())
    from_files = captioner.caption([image.path for image in images], batch_size=datamodule.batch_size)
    assert [by_id[image.image_id].n_best for image in images] == [r.n_best for r in from_files]


def test_predict_step_refuses_what_it_cannot_caption() -> None:
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "a"]
    module = CaptioningLitModule(vocab, {"_target_": target_of(CNNEncoder), "weights": None},
                                 {"_target_": "captioning.models.decoders.ShowTellDecoder", "embed_dim": 8,
                                  "hidden_size": 16}, image_size=32)
    for shape in ((3, 32, 32), (2, 1, 32, 32)):
        with pytest.raises(TypeError, match=r"predict_step takes a CaptionBatch or a \(batch, 3, H, W\) tensor"):
            module.predict_step(torch.zeros(shape), 0)
    with pytest.raises(ValueError, match=r"batch 4 holds 16x16 images; this model was trained at 32x32: "
                                         r"build_image_transform\(module.hparams.image_size\) makes them"):
        module.predict_step(torch.zeros(2, 3, 16, 16), 4)
    for pixels, values in ((torch.full((2, 3, 32, 32), 255.0), "torch.float32 values from 255 to 255"),
                           (torch.full((2, 3, 32, 32), -0.5), "torch.float32 values from -0.5 to -0.5"),
                           (torch.full((2, 3, 32, 32), float("nan")), "torch.float32 values from nan to nan"),
                           (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "torch.uint8 values from 0 to 0")):
        with pytest.raises(ValueError, match=rf"batch 0 holds {values}; it takes floating-point pixels in \[0, 1\]"):
            module.predict_step(pixels, 0)
    assert len(module.predict_step(torch.rand(2, 3, 32, 32), 0)) == 2
    assert module.predict_step(None, 0) == []


def test_in_memory_bytes_of_a_jpeg_give_the_files_caption(captioner: Captioner, tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    (tmp_path / "photo.jpg").write_bytes(buffer.getvalue())
    from_file, from_bytes = captioner.caption([tmp_path / "photo.jpg", bytearray(buffer.getvalue())])
    assert _key(from_file) == _key(from_bytes) and from_bytes.file == "<image 1>"
