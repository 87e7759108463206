"""Config groups, presets and fail-fast validation."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from captioning.config import ConfigError, check_config
from tests.conftest import PROJECT_ROOT
from tests.test_train import QUICK, _config
import train

EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_passes_the_schema_check(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}"])
    check_config(cfg)
    assert cfg.task_name == experiment


@pytest.mark.parametrize("overrides", [
    ["trainer=cpu"], ["trainer=gpu"], ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    ["logger=csv"], ["logger=many"], ["logger=wandb"],
    ["hparams_search=shapes_optuna"], ["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu"],
])
def test_trainer_logger_sweep_and_launcher_configs_compose(overrides: list[str]) -> None:
    check_config(_compose(overrides))


def test_a_mistyped_override_fails_at_once_naming_the_key() -> None:
    start = time.monotonic()
    completed = subprocess.run([sys.executable, "train.py", "model.decoder.hiden_size=3"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 5.0
    message = " ".join(completed.stderr.split())
    assert completed.returncode == 2
    assert "unknown setting 'model.decoder.hiden_size'. Settings of model.decoder: attention_dim, cell," in message
    unknown_option = subprocess.run([sys.executable, "train.py", "model/decoder=gruu"], cwd=PROJECT_ROOT,
                                    capture_output=True, text=True, timeout=120)
    assert unknown_option.returncode != 0 and "Available options in 'model/decoder'" in unknown_option.stderr
    with pytest.raises(ConfigError, match="model.decoder.hiden_size is not a setting of ShowAttendTellDecoder; "
                                          "valid settings: attention_dim, cell"):
        check_config(_compose(["+model.decoder.hiden_size=3"]))
    with pytest.raises(ConfigError, match="data.batchsize is not a setting of captioning.data.build.build_datamodule"):
        check_config(_compose(["+data.batchsize=3"]))


@pytest.mark.parametrize(("override", "expected"), [
    ("model.decoder.hidden_size=big", "error: model.decoder.hidden_size: Value 'big' of type 'str' could not be "
                                      "converted to Integer (its type is fixed by ShowAttendTellDecoderConfig)"),
    ("model.encoder.trainable_stages=all", "model.encoder.trainable_stages: Value 'all' of type 'str' could not be "
                                           "converted to Integer"),
    ("model.decoder.gate=maybe", "model.decoder.gate: Value 'maybe' is not a valid bool (type str)"),
])
def test_a_wrong_type_in_the_encoder_or_decoder_fails_while_composing(override: str, expected: str) -> None:
    start = time.monotonic()
    completed = subprocess.run([sys.executable, "train.py", override], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=120)
    assert time.monotonic() - start < 5.0  # Hydra's schema check: before torch is imported
    assert completed.returncode == 2 and expected in " ".join(completed.stderr.split())


def test_a_checkpoint_or_config_builds_only_known_components() -> None:
    with pytest.raises(ConfigError, match=r"model.decoder._target_ is 'os.system', which is not a known component: "
                                          r"one of \['captioning.models.decoders.ShowAttendTellDecoder'"):
        check_config(_compose(["model.decoder._target_=os.system"]))


def test_the_optimizer_and_the_scheduler_are_built_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"model.scheduler.T_max is not a setting of "
                                          r"torch.optim.lr_scheduler.ReduceLROnPlateau; valid settings: cooldown"):
        check_config(_compose(["model/scheduler=plateau", "+model.scheduler.T_max=3"]))
    with pytest.raises(ConfigError, match=r"model.optimizer \(torch.optim.SGD\(lr=2.0, momentum=-1, weight_decay=0.0\)\) "
                                          "cannot be built: Invalid momentum value"):
        check_config(_compose(["model/optimizer=sgd", "model.optimizer.momentum=-1"]))
    with pytest.raises(ConfigError, match=r"model.scheduler .*ReduceLROnPlateau\(mode=maximum, .* cannot be built: mode maximum"):
        check_config(_compose(["model/scheduler=plateau", "model.scheduler.mode=maximum"]))
    # a preset replaces the scheduler node as a whole: nothing of the default cosine is left over
    for experiment in ("show_attend_tell_coco", "show_tell_coco"):
        assert "T_max" not in _compose([f"experiment={experiment}"]).model.scheduler
    check_config(_compose(["model/scheduler=none"]))
    check_config(_compose(["model/optimizer=adamw", "model/scheduler=step"]))

    completed = subprocess.run([sys.executable, "train.py", "model/scheduler=plateau", "+model.scheduler.T_max=3"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "model.scheduler.T_max is not a setting of" in " ".join(completed.stderr.split())


@pytest.mark.parametrize(("override", "message"), [
    ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("data.batch_size=abc", "data.batch_size must be an integer >= 1, got 'abc'"),
    ("data.image_size=0", "data.image_size must be an integer >= 32, got 0"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
    ("model.optimizer.lr=-1", "model.optimizer.lr must be a number >= 0.0, got -1"),
    ("model.beam_size=0", "beam_size must be an integer >= 1, got 0"),
    ("model.max_decode_length=0", "max_length must be an integer >= 1, got 0"),
])
def test_a_number_out_of_range_is_named_before_anything_runs(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(_compose([override]))


def test_precision_belongs_to_the_hardware_preset_not_to_ddp() -> None:
    assert _compose(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]).trainer.precision == "32-true"
    assert _compose(["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert _compose([]).trainer.precision == "32-true"


SHAPES_PRESETS = [e for e in EXPERIMENTS if e.startswith("shapes_") or e.endswith("_shapes")]
# the Up-Down presets read precomputed region features: tests/test_precomputed.py writes them and trains
COCO_PRESETS = [e for e in EXPERIMENTS if e not in SHAPES_PRESETS and not e.startswith("updown_")]


def _preset_overrides(experiment: str, data_dir: Path) -> list[str]:
    """The recipes issue's override set: any COCO preset on the mini Karpathy set, random CNN, CPU, 2 steps."""
    annotations = [f"data.splits.{split}.annotations=dataset_coco_mini.json" for split in ("train", "val", "test")]
    return [f"experiment={experiment}", f"paths.data_dir={data_dir}", *annotations, "trainer=cpu",
            "model.encoder.weights=null", "++trainer.max_steps=2", "trainer.max_epochs=1", "data.batch_size=4",
            "data.num_workers=0"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", COCO_PRESETS)
def test_coco_presets_train_validate_and_test_on_the_mini_set(experiment: str, tmp_path: Path,
                                                               shared_data: Path) -> None:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=_preset_overrides(experiment, shared_data / "coco-val2017-mini"),
                      return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    metrics = train.run(cfg)
    monitored = cfg.callbacks.model_checkpoint.monitor.removeprefix("val/")
    assert f"val/best_{monitored}" in metrics  # validated after the second step
    assert metrics["test/loss"] > 0 and {"test/CIDEr", "human_loo/CIDEr", "model_loo/CIDEr"} <= set(metrics)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    splits = json.loads((tmp_path / "data_splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [200, 25, 25]  # restval joins train


@pytest.mark.slow
@pytest.mark.parametrize("experiment", SHAPES_PRESETS)
def test_shapes_presets_run(experiment: str, tmp_path: Path, tiny_shapes: Path) -> None:
    cfg = _config(tmp_path, tiny_shapes.parent, [f"experiment={experiment}", *QUICK, "data.image_size=64"])
    metrics = train.run(cfg)
    assert metrics["test/CIDEr"] >= 0.0


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["updown_coco", "updown_coco_scst"])
def test_updown_coco_trains_validates_and_tests_from_precomputed_features(experiment: str, tmp_path: Path,
                                                                          shared_data: Path) -> None:
    """Issue 15's acceptance: random bottom-up features in the research codebases' layout for the mini
    Karpathy set (10-40 regions per image), then the Up-Down preset for two steps; no image is read."""
    mini = shared_data / "coco-val2017-mini"
    images = json.loads((mini / "dataset_coco_mini.json").read_text())["images"]
    att_dir = tmp_path / "cocobu_att"
    att_dir.mkdir()
    rng = np.random.default_rng(0)
    for image in images:
        regions = int(rng.integers(10, 41))
        np.savez_compressed(att_dir / f"{image['cocoid']}.npz", feat=rng.random((regions, 256), dtype=np.float32))
    annotations = [f"data.splits.{split}.annotations=dataset_coco_mini.json" for split in ("train", "val", "test")]
    overrides = [f"experiment={experiment}", f"paths.data_dir={mini}", *annotations, "trainer=cpu",
                 f"data.precomputed.att_dir={att_dir}", "model.encoder.feature_dim=256", "++trainer.max_steps=2",
                 "trainer.max_epochs=1", "data.batch_size=4", "data.num_workers=0", "model.decoder.embed_dim=32",
                 "model.decoder.hidden_size=32", "model.decoder.attention_dim=16"]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    metrics = train.run(cfg)
    assert "val/best_CIDEr" in metrics and metrics["test/loss"] > 0
    assert {"test/CIDEr", "human_loo/CIDEr", "model_loo/CIDEr"} <= set(metrics)
    splits = json.loads((tmp_path / "run" / "data_splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [200, 25, 25]


def test_a_wrong_scst_setting_stops_before_anything_loads() -> None:
    with pytest.raises(ConfigError, match="model.scst: model.scst.samples must be an integer >= 2 with the mean "
                                          "baseline, got 1"):
        check_config(_compose(["experiment=shapes_scst", "model.scst.samples=1"]))
    with pytest.raises(ConfigError, match="model.scst: .*unexpected keyword argument 'sample'"):
        check_config(_compose(["experiment=shapes_scst", "+model.scst.sample=3"]))


def test_precomputed_features_need_the_precomputed_encoder_and_back() -> None:
    with pytest.raises(ConfigError, match="data.precomputed serves region features, but model.encoder is an image "
                                          "encoder: use model/encoder=precomputed"):
        check_config(_compose(["data.precomputed={att_dir: feats}"]))
    with pytest.raises(ConfigError, match="model.encoder is the precomputed-feature encoder, but data.precomputed "
                                          "is not set"):
        check_config(_compose(["model=updown"]))
    check_config(_compose(["model=updown", "data.precomputed={att_dir: feats}"]))
