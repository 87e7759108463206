"""Lightning callbacks of this project."""

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


class RandomStateCheckpoint(pl.Callback):
    """Keeps the random generators' states in every checkpoint and restores them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters, but not the generators
    that draw the data order and dropout masks; with them, a run killed and resumed from its last
    checkpoint continues exactly as the uninterrupted run would have (on one process; under DDP
    each rank restores rank 0's states). Stored as plain lists and tensors, so checkpoints still
    load with ``torch.load(weights_only=True)``.
    """

    KEY = "random_states"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        version, state, gauss = random.getstate()
        checkpoint[self.KEY] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
            "python": [version, list(state), gauss],
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(self.KEY)
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))


class ValidateAtMaxSteps(pl.Callback):
    """Validates when ``trainer.max_steps`` ends a run in the middle of an epoch.

    Lightning then simply stops, so the last steps of a step-limited recipe never compete for the
    best checkpoint (and a short smoke run never validates at all). Asking the trainer to stop at
    that step instead makes Lightning validate first, as it does for early stopping.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
