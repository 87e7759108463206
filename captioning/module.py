"""CaptioningModule: the LightningModule that trains a ``Captioner`` and scores its captions."""

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from captioning.data.batch import CaptionBatch
from captioning.data.tokenize import detokenize
from captioning.data.vocab import Vocabulary
from captioning.decoding import greedy_decode
from captioning.evaluation.coco import CocoCaptionEvaluator
from captioning.evaluation.distributed import broadcast_from_rank_zero, gather_predictions
from captioning.losses import masked_cross_entropy
from captioning.models.captioner import build_captioner

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class CaptioningModule(pl.LightningModule):
    """Teacher-forced training with masked cross-entropy; validation/test generate and score captions.

    The vocabulary and the encoder/decoder settings are hyperparameters, so a checkpoint alone
    rebuilds the model (``torch.load(..., weights_only=True)`` reads it: plain types only).
    """

    def __init__(
        self,
        vocab: list[str],
        encoder: Mapping[str, Any],
        decoder: Mapping[str, Any],
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_monitor: str = "val/CIDEr",
        label_smoothing: float = 0.0,
        max_decode_length: int = 20,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "scheduler"])
        self.vocab = Vocabulary(vocab)
        self.captioner = build_captioner(len(self.vocab), encoder, decoder)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._predictions: dict[int, list[int]] = {}
        self._evaluators: dict[str, CocoCaptionEvaluator] = {}
        self.test_captions: dict[int, str] = {}
        self.test_metrics: dict[str, float] = {}

    def training_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor:
        logits = self.captioner(batch.images, batch.tokens, batch.lengths, batch.caption_image_index)
        loss = masked_cross_entropy(logits, batch.tokens[:, 1:], self.vocab.pad_id, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.tokens.shape[0])
        return loss

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: CaptionBatch, stage: str) -> None:
        """Loss on every reference caption, and one greedy caption per image."""
        features = self.captioner.encode(batch.images)
        if batch.tokens.numel():
            logits = self.captioner.decoder(features.select(batch.caption_image_index), batch.tokens, batch.lengths)
            loss = masked_cross_entropy(logits, batch.tokens[:, 1:], self.vocab.pad_id)
            self.log(f"{stage}/loss", loss, batch_size=batch.tokens.shape[0], sync_dist=True)
        decoded = greedy_decode(self.captioner.decoder, features, self.vocab.bos_id, self.vocab.eos_id,
                                self.hparams.max_decode_length, self.vocab.pad_id)
        for image_id, tokens in zip(batch.image_ids.tolist(), decoded.tokens.tolist()):
            self._predictions[image_id] = tokens

    def on_validation_epoch_end(self) -> None:
        self._score_predictions("val")

    def on_test_epoch_end(self) -> None:
        self._score_predictions("test")

    def _score_predictions(self, stage: str) -> None:
        """Gather every rank's captions, score once on rank 0, log the same numbers on all ranks."""
        predictions = gather_predictions(self._predictions)
        self._predictions = {}
        if self.trainer.sanity_checking:
            return
        captions = {i: detokenize(self.vocab.decode(tokens)) for i, tokens in sorted(predictions.items())}
        metrics = self._evaluator(stage).score(captions).metrics if self.trainer.is_global_zero else None
        metrics = broadcast_from_rank_zero(metrics)  # float64, as the evaluator computed them
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, sync_dist=False)
        if stage == "test":
            self.test_captions = captions
            self.test_metrics = {f"test/{name}": value for name, value in metrics.items()}

    def _evaluator(self, stage: str) -> CocoCaptionEvaluator:
        if stage not in self._evaluators:
            self._evaluators[stage] = CocoCaptionEvaluator(self.trainer.datamodule.references(stage))
        return self._evaluators[stage]

    def teardown(self, stage: str) -> None:
        for evaluator in self._evaluators.values():
            evaluator.close()
        self._evaluators.clear()

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("no optimizer configured: set model.optimizer (a _partial_ torch.optim class)")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("vocab")
        if saved is not None and list(saved) != self.vocab.tokens:
            raise ValueError("the checkpoint's vocabulary differs from this run's data: evaluate it on the data "
                             "it was trained with (same data config and min_word_count)")
