"""Config groups, presets and fail-fast validation."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

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
    with pytest.raises(ConfigError, match="data.batchsize is not a setting of .*CaptionDataModule"):
        check_config(_compose(["+data.batchsize=3"]))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("shapes_")])
def test_shapes_presets_run(experiment: str, tmp_path: Path, tiny_shapes: Path) -> None:
    cfg = _config(tmp_path, tiny_shapes.parent, [f"experiment={experiment}", *QUICK, "data.image_size=64"])
    metrics = train.run(cfg)
    assert metrics["test/CIDEr"] >= 0.0
