"""Exact resume: a run killed (SIGKILL) and resumed from last.ckpt ends with the uninterrupted run's weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT_ROOT, TINY_SHAPES

OVERRIDES = [
    f"data.generate_shapes.num_train={TINY_SHAPES.num_train}", f"data.generate_shapes.num_val={TINY_SHAPES.num_val}",
    f"data.generate_shapes.num_test={TINY_SHAPES.num_test}", f"data.generate_shapes.seed={TINY_SHAPES.seed}",
    "data.image_size=32", "data.batch_size=8", "data.min_word_count=1", "model=show_tell",
    "model.decoder.embed_dim=16", "model.decoder.hidden_size=32", "model.decoder.dropout=0.3",
    "data.train_captions_per_image=random", "trainer.max_epochs=4", "trainer.num_sanity_val_steps=0", "test=false",
]


def _command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "train.py"), *OVERRIDES, f"hydra.run.dir={output}", *extra]


def _epoch(checkpoint: Path) -> int:
    try:
        return int(torch.load(checkpoint, weights_only=True, map_location="cpu")["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tiny_shapes: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CAPTIONING_DATA_DIR": str(tiny_shapes.parent)}
    run = {"cwd": PROJECT_ROOT, "env": env, "capture_output": True, "text": True, "timeout": 600}
    whole = subprocess.run(_command(tmp_path / "whole"), **run)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = subprocess.Popen(_command(tmp_path / "killed"), cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while _epoch(last) < 1 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch's steps
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 1 <= _epoch(last) < 3  # a complete checkpoint from before the kill

    resumed = subprocess.run(_command(tmp_path / "resumed", f"ckpt_path={last}"), **run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    got = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert _epoch(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == 3
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
