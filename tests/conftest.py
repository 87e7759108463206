"""Shared fixtures: a tiny shapes dataset and the read-only ../shared data (skipped when absent)."""

import os
from pathlib import Path

import pytest

from captioning.data.shapes import ShapesConfig, ensure_shapes_dataset
from captioning.schemas import register_schemas

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CAPTIONING_SHARED_DIR", PROJECT_ROOT.parent / "shared"))
TINY_SHAPES = ShapesConfig(num_train=48, num_val=10, num_test=12, image_size=64, seed=3)

register_schemas()  # the tests compose conf/ without train.py's main


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; skip with the reason on a fresh clone, fail when CI requires it."""
    data = SHARED_DIR / "data"
    if not (data / "coco-val2017-mini").is_dir():
        message = (f"shared test data not found at {data} (a fresh clone has no ../shared); "
                   "set CAPTIONING_SHARED_DIR to its location")
        if os.environ.get("CAPTIONING_REQUIRE_SHARED") == "1":
            pytest.fail(message + " — CAPTIONING_REQUIRE_SHARED=1 makes this a failure")
        pytest.skip(message)
    return data


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated shapes dataset, shared by the tests that only read it."""
    return ensure_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", TINY_SHAPES)
