"""Lightning callbacks of this project."""

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from captioning.checkpoints import nonfinite_tensors
from captioning.config import ConfigError

log = logging.getLogger(__name__)


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


class NonFiniteTrainingError(ConfigError):
    """Training produced a NaN or an infinity (most often: a learning rate too high); the message names the step."""


class NonFiniteGuard(pl.Callback):
    """Stops training at the first NaN/inf loss or gradient, before the optimizer applies it.

    The check runs after the backward pass and before the optimizer step, so the weights that any
    checkpoint can hold are still those of the last finite step. With ``skip_nonfinite_steps`` the
    step is skipped instead (every gradient dropped, so the optimizer leaves the weights and its
    state as they were) and counted in ``train/skipped_nonfinite_steps``. Under a grad scaler
    (fp16 mixed precision) an infinite gradient is the scaler's business, which skips the step
    itself, so only the loss is checked. Either way a non-finite validation metric or weight never
    becomes a checkpoint: the run stops first, naming it.
    """

    def __init__(self, skip_nonfinite_steps: bool = False) -> None:
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped = 0
        self._loss_finite: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # a tensor: no device sync here
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None  # gathered over the accumulated batches
        named = [(name, p) for name, p in pl_module.named_parameters() if p.grad is not None]
        if named and not self._grad_scaler(trainer):
            grad_finite = torch.stack([torch.isfinite(p.grad).all() for _, p in named]).cpu().tolist()
        else:
            grad_finite = []
        loss_ok = loss_finite is None or bool(loss_finite)
        bad_here = not loss_ok or not all(grad_finite)
        # every rank takes the same decision (the gradients are averaged already; each rank has its own loss)
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        culprit = _culprit(loss_ok, bad_here, [name for (name, _), ok in zip(named, grad_finite) if not ok])
        where = (f"at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                 f"batch {trainer.fit_loop.epoch_loop.batch_idx})")
        if self.skip_nonfinite_steps:
            for _, parameter in pl_module.named_parameters():
                parameter.grad = None  # the optimizer skips parameters without a gradient: weights and state stay
            self.skipped += 1
            log.warning("skipped the training step %s: %s (%d skipped so far)", where, culprit, self.skipped)
            return
        raise NonFiniteTrainingError(
            f"training stopped {where}: {culprit}. The weights were not updated with it (they are the last finite "
            f"step's), and no checkpoint is written from it. The likely cause is a learning rate too high: "
            f"model.optimizer.lr (here {_learning_rates(trainer)}); lower it, or clip gradients "
            "(trainer.gradient_clip_val=1.0). To skip such steps instead, set "
            "callbacks.nonfinite_guard.skip_nonfinite_steps=true")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.skip_nonfinite_steps:
            pl_module.log("train/skipped_nonfinite_steps", float(self.skipped), on_step=False, on_epoch=True,
                          reduce_fx="max", sync_dist=False, batch_size=1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before ModelCheckpoint's own on_validation_end (Lightning runs checkpoint callbacks last): a NaN
        # monitored value would otherwise still be saved as the first "best"
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        monitored = {getattr(callback, "monitor", None) for callback in trainer.checkpoint_callbacks}
        for name, value in trainer.callback_metrics.items():
            checked = name.startswith("val/") or name in monitored
            if checked and isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                raise NonFiniteTrainingError(
                    f"training stopped at epoch {trainer.current_epoch} (global step {trainer.global_step}): the "
                    f"validation metric {name} is {float(value)}, so the model has diverged and no checkpoint is "
                    f"written from it. The likely cause is a learning rate too high: model.optimizer.lr (here "
                    f"{_learning_rates(trainer)}); lower it, or clip gradients (trainer.gradient_clip_val=1.0)")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            raise NonFiniteTrainingError(
                f"training stopped at epoch {trainer.current_epoch} (global step {trainer.global_step}): "
                f"{len(bad)} weight tensors are not finite (the first {bad[0]}), so no checkpoint is written. "
                f"The likely cause is a learning rate too high: model.optimizer.lr (here {_learning_rates(trainer)})")

    @staticmethod
    def _grad_scaler(trainer: pl.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None


def _culprit(loss_ok: bool, bad: bool, parameters: list[str]) -> str:
    if not loss_ok:
        return "the training loss is NaN or infinite"
    if parameters:
        return f"the gradient of {len(parameters)} parameters is NaN or infinite (the first {parameters[0]})"
    return "another process's loss or gradient is NaN or infinite" if not bad else "a NaN or infinite value"


def _learning_rates(trainer: pl.Trainer) -> str:
    # the configured rates (a scheduler may have lowered the current ones, to 0 at the end of a cosine)
    rates = sorted({group.get("initial_lr", group.get("lr")) for optimizer in trainer.optimizers
                    for group in optimizer.param_groups if "lr" in group}, reverse=True)
    text = ", ".join(f"{rate:g}" for rate in rates) or "unknown"
    return f"{text}; model.encoder_lr sets the encoder's own" if len(rates) > 1 else text
