"""train.py's own code path, composed with Hydra's compose API on a tiny dataset."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from pycocotools.coco import COCO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from captioning.evaluation.coco import CocoCaptionEvaluator
from tests.conftest import PROJECT_ROOT, TINY_SHAPES
import train

TINY_SHAPES_OVERRIDES = [
    f"data.generate_shapes.num_train={TINY_SHAPES.num_train}",
    f"data.generate_shapes.num_val={TINY_SHAPES.num_val}",
    f"data.generate_shapes.num_test={TINY_SHAPES.num_test}",
    f"data.generate_shapes.seed={TINY_SHAPES.seed}",
]
TINY_OVERRIDES = [
    "data.batch_size=8",
    "data.image_size=64",
    "data.min_word_count=1",
    "model.decoder.embed_dim=16",
    "model.decoder.hidden_size=32",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
]


def _config(tmp_path: Path, data_dir: Path, overrides: list[str], shapes: bool = True) -> DictConfig:
    tiny = [*TINY_SHAPES_OVERRIDES, *TINY_OVERRIDES] if shapes else TINY_OVERRIDES
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*tiny, *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.mark.slow
def test_train_then_evaluate_the_best_checkpoint(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    metrics = train.run(_config(tmp_path / "fit", data_dir, []))

    output = tmp_path / "fit"
    best, last = output / "checkpoints" / "best.ckpt", output / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    checkpoint = torch.load(best, weights_only=True)  # plain types only, as the design requires
    assert checkpoint["hyper_parameters"]["vocab"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"val/CIDEr", "train/loss"} <= set(events.Tags()["scalars"])
    assert "val_samples/0" in events.Tags()["images"]  # a validation image with its captions, every epoch
    text = events.Tensors("val_samples/0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "generated:" in text and "reference:" in text

    written = json.loads((output / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    for name in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0.0 <= written[f"test/{name}"] and written[f"human_loo/{name}"] > 0.0
    assert written["human_loo/Bleu_1"] > 0.5

    results_file = output / "test_captions.json"
    results = json.loads(results_file.read_text())
    coco = COCO(str(data_dir / "shapes" / "annotations" / "captions_test.json"))
    assert sorted(r["image_id"] for r in results) == sorted(coco.getImgIds())
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    coco.loadRes(str(results_file))  # the official results format
    references = {i: [a["caption"] for a in coco.imgToAnns[i]] for i in coco.getImgIds()}
    with CocoCaptionEvaluator(references) as evaluator:  # metrics.json scores exactly these captions
        scored = evaluator.score({r["image_id"]: r["caption"] for r in results}).metrics
    assert {f"test/{name}": value for name, value in scored.items()} == {
        name: value for name, value in written.items() if name.startswith("test/") and name != "test/loss"}

    rescored = train.run(_config(tmp_path / "eval", data_dir, ["train=false", f"ckpt_path={best}"]))
    assert rescored == pytest.approx({k: v for k, v in metrics.items() if not k.startswith("val/")}, abs=1e-12)
    assert json.loads((tmp_path / "eval" / "test_captions.json").read_text()) == results


def test_evaluating_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ckpt_path"):
        train.run(_config(tmp_path, tmp_path / "data", ["train=false"]))


QUICK = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["model=show_tell", "model/decoder=gru"],
    ["model=show_tell", "model/decoder=rnn", "model.decoder.num_layers=2"],
    ["model=show_tell", "model/decoder=show_tell", "model.decoder.tie_embeddings=true",
     "model/encoder=efficientnet_lite0", "model.encoder.trainable_stages=1", "model.encoder_lr=1e-4"],
    ["model=show_attend_tell", "model.beam_size=3", "model.decoder.context_encoder=birnn", "model.decoder.cell=gru",
     "model.scheduled_sampling={start_epoch: 0, increase_every: 1, increase_by: 0.5, max_probability: 0.5}"],
    ["model=show_attend_tell", "model.encoder.trainable_stages=0", "data.feature_cache=true"],
], ids=["show_tell-gru", "show_tell-rnn", "show_tell-tied-efficientnet", "show_attend_tell-beam-sampling",
        "show_attend_tell-feature-cache"])
def test_every_decoder_and_encoder_config_trains_and_scores(tmp_path: Path, tiny_shapes: Path,
                                                            overrides: list[str]) -> None:
    cfg = _config(tmp_path, tiny_shapes.parent, [*QUICK, *overrides])
    metrics = train.run(cfg)
    assert metrics["test/CIDEr"] >= 0.0 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if "data.feature_cache=true" in overrides:
        best = tmp_path / "checkpoints" / "best.ckpt"
        evaluated = train.run(_config(tmp_path, tiny_shapes.parent,
                                      [*QUICK, *overrides, "train=false", f"ckpt_path={best}"]))
        assert evaluated["test/CIDEr"] == metrics["test/CIDEr"]
        # the checkpoint's encoder found the features computed for training: one cache, not two
        assert len(list((tmp_path / "cache" / "features").glob("*/manifest.json"))) == 1


def _every_split(key: str, value: str) -> list[str]:
    return [f"data.splits.{split}.{key}={value}" for split in ("train", "val", "test")]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["data=coco2017", *_every_split("annotations", "annotations/captions_mini.json"),
     *_every_split("images", "val2017")],
    ["data=coco2014_karpathy", *_every_split("annotations", "dataset_coco_mini.json")],
    # the official val2017 file lists 5,000 images, 250 of them present: skip mode trains on those
    ["data=coco2017", "data.splits.train.annotations=annotations/captions_mini.json",
     *_every_split("images", "val2017"), "data.on_bad_image=skip"],
], ids=["coco2017", "karpathy", "coco2017-skip-missing"])
def test_training_runs_on_real_coco_photos(tmp_path: Path, shared_data: Path, overrides: list[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, shared_data / "coco-val2017-mini", [*QUICK, "data.num_workers=0", *overrides],
                  shapes=False)
    with caplog.at_level("WARNING"):
        metrics = train.run(cfg)
    assert metrics["test/CIDEr"] >= 0.0 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if "data.on_bad_image=skip" in overrides:
        assert "val: skipped 4750 of 5000 images that cannot be used" in caplog.text
