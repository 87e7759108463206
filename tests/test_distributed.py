"""Validation under DDP scores every image exactly once and logs the same metrics on every rank."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.data.shapes import ShapesConfig, ensure_shapes_dataset
from captioning.evaluation.coco import METRICS
from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "ddp_validation.py"


def _validate(data_root: Path, prefix: Path, devices: int, *options: str) -> list[dict[str, float]]:
    command = [sys.executable, str(SCRIPT), str(data_root), str(prefix), "--devices", str(devices), *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(Path(f"{prefix}.rank{rank}.json").read_text()) for rank in range(devices)]


@pytest.mark.slow
def test_two_process_validation_equals_one_process_on_an_odd_number_of_images(tmp_path: Path) -> None:
    # 11 val images in batches of 3 over 2 ranks: the sampler pads rank 1 with a duplicate image
    data_root = ensure_shapes_dataset(tmp_path / "shapes", ShapesConfig(num_train=20, num_val=11, num_test=2, seed=5))
    weights = str(tmp_path / "weights.pt")
    (single,) = _validate(data_root, tmp_path / "single", 1, "--weights", weights, "--train-steps", "60")
    rank0, rank1 = _validate(data_root, tmp_path / "ddp", 2, "--weights", weights)
    scored = [f"val/{name}" for name in METRICS]
    assert all(name in single for name in scored)
    assert {n: rank0[n] for n in scored} == {n: single[n] for n in scored}  # exactly: the same captions
    assert {n: rank1[n] for n in scored} == {n: rank0[n] for n in scored}  # every rank logs rank 0's numbers
    assert single["val/CIDEr"] > 0.1 and single["val/Bleu_1"] > 0.3  # real captions, not empty ones
