"""train.py's own code path, composed with Hydra's compose API on a tiny dataset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from pycocotools.coco import COCO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from captioning.caption import Captioner
from captioning.data.shapes import ShapesConfig, ensure_shapes_dataset
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
    assert written["val/best_CIDEr"] == pytest.approx(max(
        event.value for event in EventAccumulator(str(output / "tensorboard")).Reload().Scalars("val/CIDEr")))

    results_file = output / "test_captions.json"
    results = json.loads(results_file.read_text())
    coco = COCO(str(data_dir / "shapes" / "annotations" / "captions_test.json"))
    assert sorted(r["image_id"] for r in results) == sorted(coco.getImgIds())
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    coco.loadRes(str(results_file))  # the official results format
    references = {i: [a["caption"] for a in coco.imgToAnns[i]] for i in coco.getImgIds()}
    with CocoCaptionEvaluator(references) as evaluator:  # metrics.json scores exactly these captions
        scored = evaluator.score({r["image_id"]: r["caption"] for r in results}).metrics
        fair = evaluator.leave_one_out({r["image_id"]: r["caption"] for r in results})
    assert {f"test/{name}": value for name, value in scored.items()} == {
        name: value for name, value in written.items() if name.startswith("test/") and name != "test/loss"}
    assert {f"model_loo/{name}": value for name, value in fair.model.items()} == {
        name: value for name, value in written.items() if name.startswith("model_loo/")}
    assert {f"human_loo/{name}": value for name, value in fair.human.items()} == {
        name: value for name, value in written.items() if name.startswith("human_loo/")}

    rescored = train.run(_config(tmp_path / "eval", data_dir, ["train=false", f"ckpt_path={best}"]))
    assert rescored == pytest.approx({k: v for k, v in metrics.items() if not k.startswith("val/")}, abs=1e-12)
    assert json.loads((tmp_path / "eval" / "test_captions.json").read_text()) == results
    assert {"human_loo/CIDEr", "model_loo/CIDEr"} <= set(json.loads((tmp_path / "eval" / "metrics.json").read_text()))


def test_evaluating_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ckpt_path"):
        train.run(_config(tmp_path, tmp_path / "data", ["train=false"]))


@pytest.mark.parametrize("key", ["init_from", "ckpt_path"])
def test_a_missing_checkpoint_is_named_before_any_data_is_prepared(tmp_path: Path, key: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"{key}=.*nowhere.ckpt is not a file"):
        train.run(_config(tmp_path, tmp_path / "data", [f"{key}={tmp_path / 'nowhere.ckpt'}"]))
    assert not (tmp_path / "data").exists()  # refused before the shapes data was generated


QUICK = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["model=show_tell", "model/decoder=gru"],
    ["model=show_tell", "model/decoder=rnn", "model.decoder.num_layers=2"],
    ["model=show_tell", "model/decoder=show_tell", "model.decoder.tie_embeddings=true",
     "model/encoder=efficientnet_lite0", "model.encoder.trainable_stages=1", "model.encoder_lr=1e-4"],
    ["model=show_attend_tell", "model.beam_size=3", "model.decoder.context_encoder=birnn", "model.decoder.cell=gru",
     # sampled words from the second epoch on (ruotianluo's schedule gives 0 in the start epoch)
     "model.scheduled_sampling={start_epoch: 0, increase_every: 1, increase_by: 0.5, max_probability: 0.5}",
     "trainer.max_epochs=2"],
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


# data=coco2017 validates on images held out from train: here 25 of the 250 mini photos
COCO2017_MINI = ["data.splits.train.annotations=annotations/captions_mini.json", "data.splits.train.images=val2017",
                 "data.splits.test.images=val2017", "data.val_from_train=25"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["data=coco2017", *COCO2017_MINI, "data.splits.test.annotations=annotations/captions_mini.json"],
    ["data=coco2014_karpathy", *_every_split("annotations", "dataset_coco_mini.json")],
    # the official val2017 file lists 5,000 images, 250 of them present: skip mode tests on those
    ["data=coco2017", *COCO2017_MINI, "data.on_bad_image=skip"],
], ids=["coco2017", "karpathy", "coco2017-skip-missing"])
def test_training_runs_on_real_coco_photos(tmp_path: Path, shared_data: Path, overrides: list[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, shared_data / "coco-val2017-mini", [*QUICK, "data.num_workers=0", *overrides],
                  shapes=False)
    with caplog.at_level("WARNING"):
        metrics = train.run(cfg)
    assert metrics["test/CIDEr"] >= 0.0 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if "data.on_bad_image=skip" in overrides:
        assert "test: skipped 4750 of 5000 images that cannot be used" in caplog.text


def _parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights (not BatchNorm statistics, which move in train mode even at lr 0)."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {name: value for name, value in state.items()
            if not name.rpartition(".")[2].startswith(("running_", "num_batches"))}


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path: Path, tiny_shapes: Path) -> None:
    train.run(_config(tmp_path / "first", tiny_shapes.parent, [*QUICK, "test=false"]))
    best = tmp_path / "first" / "checkpoints" / "best.ckpt"
    frozen = ["model.optimizer.lr=0", "model.encoder_lr=0"]  # so the new run's weights stay the loaded ones
    three_steps = ["test=false", f"init_from={best}", "++trainer.max_steps=3", "+trainer.limit_val_batches=1"]
    train.run(_config(tmp_path / "second", tiny_shapes.parent, [*three_steps, *frozen]))
    second = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (second["epoch"], second["global_step"]) == (0, 3)  # a new run: epoch 0, its own 3 steps
    assert second["optimizer_states"][0]["state"][0]["step"] == 3  # a fresh optimizer
    loaded, started = _parameters(best), _parameters(tmp_path / "second" / "checkpoints" / "last.ckpt")
    assert loaded.keys() == started.keys()
    assert all(torch.equal(loaded[name], started[name]) for name in loaded)

    # the feature cache is computed with the loaded encoder (the module checks the cache's identity)
    train.run(_config(tmp_path / "cached", tiny_shapes.parent,
                      [*three_steps, "model.encoder.trainable_stages=0", "data.feature_cache=true"]))
    (manifest,) = (tmp_path / "cached" / "cache" / "features").glob("*/manifest.json")
    loaded_encoder = Captioner.from_checkpoint(best, device="cpu").model.encoder
    assert json.loads(manifest.read_text())["encoder"] == loaded_encoder.cache_identity()

    with pytest.raises(ValueError, match=r"tensor net\.decoder\.\S+ is \(\d+, \d+\) in the checkpoint but"):
        train.run(_config(tmp_path / "shape", tiny_shapes.parent,
                          [*QUICK, f"init_from={best}", "model.decoder.hidden_size=48"]))
    with pytest.raises(ValueError, match="its vocabulary (differs from this run's at id|has .* words)"):
        train.run(_config(tmp_path / "vocab", tiny_shapes.parent, [*QUICK, f"init_from={best}",
                                                                   "data.min_word_count=3"]))
    with pytest.raises(ValueError, match="give one of them"):
        train.run(_config(tmp_path / "both", tiny_shapes.parent, [f"init_from={best}", f"ckpt_path={best}"]))


def _train_py(*overrides: str) -> tuple[dict[str, float], str]:
    """Run train.py as a user does; returns the run's metrics.json and what it printed."""
    run_dir = next(o.partition("=")[2] for o in overrides if o.startswith("hydra.run.dir="))
    completed = subprocess.run([sys.executable, "train.py", *overrides], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((Path(run_dir) / "metrics.json").read_text()), completed.stdout + completed.stderr


@pytest.mark.slow
def test_rescoring_is_the_same_on_two_processes_and_for_any_batch_size(tmp_path: Path) -> None:
    # 11 test images over 2 ranks: the distributed sampler repeats one image to even them out
    shapes = ShapesConfig(num_train=48, num_val=10, num_test=11, image_size=64, seed=3)
    data_dir = tmp_path / "data"
    ensure_shapes_dataset(data_dir / "shapes", shapes)
    data = [f"data.generate_shapes.{key}={getattr(shapes, key)}"
            for key in ("num_train", "num_val", "num_test", "image_size", "seed")]
    train.run(_config(tmp_path / "fit", data_dir, [*data, *QUICK], shapes=False))
    common = [*data, *TINY_OVERRIDES, "train=false", f"ckpt_path={tmp_path / 'fit' / 'checkpoints' / 'best.ckpt'}",
              f"paths.data_dir={data_dir}", f"paths.cache_dir={tmp_path / 'cache'}", "logger=csv"]
    one, _ = _train_py(*common, f"hydra.run.dir={tmp_path / 'one'}")
    two, printed = _train_py(*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             f"hydra.run.dir={tmp_path / 'two'}")
    assert "Starting with 2 processes" in printed
    batched, _ = _train_py(*common, "data.batch_size=3", f"hydra.run.dir={tmp_path / 'batched'}")
    assert one["test/CIDEr"] > 0 and one["model_loo/CIDEr"] > 0
    for other in (two, batched):
        assert other.keys() == one.keys()
        assert other["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6, abs=1e-6)
        assert {k: v for k, v in other.items() if k != "test/loss"} == {k: v for k, v in one.items() if k != "test/loss"}


@pytest.mark.slow
def test_a_sweep_optimises_validation_and_never_scores_the_test_split(tmp_path: Path, tiny_shapes: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    completed = subprocess.run(
        [sys.executable, "train.py", "-m", "hparams_search=shapes_optuna", "hydra.sweeper.n_trials=2",
         *TINY_SHAPES_OVERRIDES, *TINY_OVERRIDES, *QUICK, "logger=csv", f"paths.data_dir={tiny_shapes.parent}",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    trials = sorted(path.parent for path in sweep_dir.glob("*/metrics.json"))
    assert len(trials) == 2
    for trial in trials:
        metrics = json.loads((trial / "metrics.json").read_text())
        assert metrics["val/best_CIDEr"] >= 0.0
        assert not any(name.startswith(("test/", "human_loo/", "model_loo/")) for name in metrics)
        assert not (trial / "test_captions.json").exists()
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_value" in results


def test_an_optimized_metric_the_run_did_not_produce_is_named() -> None:
    assert train.optimized_metric({"val/best_CIDEr": 1.5}, "val/best_CIDEr") == 1.5
    with pytest.raises(KeyError, match=r"optimized_metric='val/best_Bleu_4' was not produced .*val/best_CIDEr"):
        train.optimized_metric({"val/best_CIDEr": 1.5}, "val/best_Bleu_4")


@pytest.mark.slow
def test_self_critical_training_runs_under_two_process_ddp(tmp_path: Path, tiny_shapes: Path) -> None:
    """SCST from a cross-entropy checkpoint (the shapes_scst preset's use) on 2 CPU processes."""
    train.run(_config(tmp_path / "xe", tiny_shapes.parent, QUICK))
    best = tmp_path / "xe" / "checkpoints" / "best.ckpt"
    metrics, printed = _train_py(
        "experiment=shapes_scst", f"init_from={best}", *TINY_SHAPES_OVERRIDES, *TINY_OVERRIDES, *QUICK,
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", "test=false",
        f"paths.data_dir={tiny_shapes.parent}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'scst'}")
    assert "Starting with 2 processes" in printed
    assert 0.0 <= metrics["train/reward"] and metrics["train/sample_length"] >= 1.0  # the last step's, logged
    assert "train/loss" not in metrics and "train/scst_loss" in metrics  # SCST from the first step
    assert metrics["val/best_CIDEr"] >= 0.0
