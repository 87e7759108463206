"""CaptioningLitModule: the LightningModule that trains an ``EncoderDecoder`` and scores its captions."""

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from captioning.caption import CaptionResult
from captioning.checkpoints import VOCAB_FINGERPRINT, check_finite, describe, load_checkpoint
from captioning.config import CheckpointMismatchError
from captioning.data.batch import CaptionBatch, checked_batch
from captioning.data.tokenize import detokenize
from captioning.data.vocab import EOS, Vocabulary
from captioning.decoding import DecodedCaptions, GenerationSettings, generate
from captioning.evaluation.cider_reward import CiderD
from captioning.evaluation.coco import CocoCaptionEvaluator
from captioning.evaluation.distributed import broadcast_from_rank_zero, gather_predictions
from captioning.losses import caption_negative_log_likelihood, doubly_stochastic_penalty, masked_cross_entropy
from captioning.models.decoders import DecoderOutput, PreparedImages
from captioning.models.encoder_decoder import build_encoder_decoder
from captioning.models.encoders import EncodedImages
from captioning.scheduled_sampling import SamplingSchedule, scheduled_sampling_forward
from captioning.scst import ScstSettings, scst_step

log = logging.getLogger(__name__)

END_TOKEN = EOS  # ends the references and the finished samples the SCST reward scores

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@runtime_checkable
class ReferenceCaptions(Protocol):
    """What the module needs of its data module besides batches: each split's human captions."""

    def references(self, split: str) -> dict[int, list[str]]:
        """Raw reference captions by image id."""


class CaptioningLitModule(pl.LightningModule):
    """Teacher-forced training with masked cross-entropy; validation/test generate and score captions.

    The vocabulary and the encoder/decoder settings are hyperparameters, so a checkpoint alone
    rebuilds the model (``torch.load(..., weights_only=True)`` reads it: plain types only).
    ``attention_penalty`` weighs the doubly-stochastic attention loss (attention decoders only);
    ``encoder_lr`` gives the encoder's trainable stages their own learning rate; ``beam_size`` 1
    decodes greedily during validation/test, more uses batched beam search. The decoding
    hyperparameters make ``generation`` (``GenerationSettings.from_hparams``, which
    ``Captioner.from_checkpoint`` calls too, so the CLI decodes as validation did). ``image_size`` records
    the input size the model was trained at, for captioning new images from the checkpoint alone.
    ``logged_samples`` validation images go to TensorBoard each epoch with their captions.
    ``allow_unk`` lets decoding generate ``<unk>`` (never, by default); ``block_trigrams`` stops beam
    search from repeating a word trigram within a caption.
    ``scst`` (``ScstSettings``): from its ``start_epoch`` on, self-critical training with a CIDEr-D reward
    against each image's training references (document frequencies from the training split) replaces
    cross-entropy.
    ``val/loss`` and ``test/loss`` are corpus-level: the summed negative log-likelihood of every real
    word of every reference caption over the number of those words, for any batching and any number
    of processes (each image counted once).
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
        attention_penalty: float = 1.0,
        scheduled_sampling: Mapping[str, Any] | None = None,
        scst: Mapping[str, Any] | None = None,
        encoder_lr: float | None = None,
        max_decode_length: int = 20,
        beam_size: int = 1,
        length_penalty: float = 0.0,
        allow_unk: bool = False,
        block_trigrams: bool = False,
        image_size: int | None = None,
        logged_samples: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["optimizer", "scheduler"])
        self.vocab = Vocabulary(vocab)
        self.net = build_encoder_decoder(len(self.vocab), encoder, decoder)
        self.generation = GenerationSettings.from_hparams(self.hparams)  # checked now, not at the first validation
        self.sampling_schedule = SamplingSchedule(**scheduled_sampling) if scheduled_sampling else None
        self.scst = ScstSettings(**scst) if scst else None
        self._reward: CiderD | None = None  # built from the training references at the first SCST step
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._predictions: dict[int, list[int]] = {}
        self._losses: dict[int, tuple[float, int]] = {}  # image id -> (summed NLL, words) of its references
        self._samples: list[tuple[int, torch.Tensor]] = []
        self._evaluators: dict[str, CocoCaptionEvaluator] = {}
        self._encoder_identity: dict[str, Any] | None = None  # of self.net.encoder, for batches of cached features
        self.test_captions: dict[int, str] = {}
        self.test_metrics: dict[str, float] = {}

    def training_step(self, batch: CaptionBatch | None, batch_idx: int) -> torch.Tensor | None:
        batch = checked_batch(batch)  # also without the data module's hook (a loader passed to the Trainer)
        if batch is None:  # every image of the batch was skipped as unreadable (data.on_bad_image=skip)
            return None
        if self.scst is not None and self.current_epoch >= self.scst.start_epoch:
            return self._self_critical_step(batch)
        features = self.encode_batch(batch).select(batch.caption_image_index)
        probability = self.sampling_schedule.probability(self.current_epoch) if self.sampling_schedule else 0.0
        if probability > 0:
            output = scheduled_sampling_forward(self.net.decoder, features, batch.tokens, batch.lengths,
                                                probability)
        else:
            output = self.net.decoder(features, batch.tokens, batch.lengths)
        loss = self._loss(output, batch, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.tokens.shape[0])
        return loss

    def _self_critical_step(self, batch: CaptionBatch) -> torch.Tensor:
        """SCST: ``scst.samples`` captions sampled per image, rewarded by CIDEr-D, minus the baseline."""
        encoded = self.encoder_outputs(batch)  # (images, ...)
        prepared = self.net.decoder.prepare(encoded)
        images = batch.image_ids.shape[0]
        rows = torch.arange(images, device=batch.image_ids.device).repeat_interleave(self.scst.samples)
        sampling = GenerationSettings(strategy="sample", max_length=self.scst.max_length,
                                      allow_unk=self.generation.allow_unk)
        samples = generate(self.net.decoder, prepared.select(rows), self.vocab, sampling, differentiable=True)
        greedy = None
        if self.scst.baseline == "greedy":  # decoded as at test time: dropout off (prepare's too), no gradient
            self.net.decoder.eval()
            try:
                greedy = generate(self.net.decoder, encoded, self.vocab, replace(sampling, strategy="greedy"))
            finally:
                self.net.decoder.train()
        if self._reward is None:
            self._reward = CiderD(self._references("train"), end_token=END_TOKEN)
        step = scst_step(samples, greedy, batch.image_ids.tolist(), self._caption_words, self._reward.scores,
                         self.scst)
        self.log_dict({"train/scst_loss": step.loss, "train/reward": step.reward, "train/baseline": step.baseline,
                       "train/advantage": step.advantage, "train/sample_length": step.sample_length,
                       "train/entropy": step.entropy}, prog_bar=False, batch_size=images)
        return step.loss

    def _caption_words(self, decoded: DecodedCaptions) -> list[str]:
        """Decoded rows -> the space-separated words the reward scores, ending with ``END_TOKEN`` where the
        caption generated ``<eos>`` (not where ``max_length`` cut it)."""
        words = (decoded.tokens != self.vocab.pad_id).sum(dim=1)  # (rows,) <eos> is already <pad> here
        return [" ".join([*self.vocab.decode(row), *([END_TOKEN] if ended else [])])
                for row, ended in zip(decoded.tokens.tolist(), (decoded.lengths > words).tolist())]

    def encode_batch(self, batch: CaptionBatch) -> PreparedImages:
        """The batch's images through the encoder, or its cached encoder features, ready for the decoder."""
        return self.net.decoder.prepare(self.encoder_outputs(batch))

    def encoder_outputs(self, batch: CaptionBatch) -> EncodedImages:
        """The encoder's outputs for the batch: computed from its pixels, or its cached / precomputed features."""
        if batch.features is not None:
            self._check_features_from(batch)
            return self.net.cached_outputs(batch.features, batch.feature_mask)
        return self.net.encoder(batch.images)

    def _loss(self, output: DecoderOutput, batch: CaptionBatch, label_smoothing: float = 0.0) -> torch.Tensor:
        loss = masked_cross_entropy(output.word_logits, batch.tokens[:, 1:], self.vocab.pad_id, label_smoothing)
        if output.attention is not None and self.hparams.attention_penalty > 0:
            loss = loss + self.hparams.attention_penalty * doubly_stochastic_penalty(output.attention, output.mask)
        return loss

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val", batch_idx)

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test", batch_idx)

    def _evaluation_step(self, batch: CaptionBatch | None, stage: str, batch_idx: int) -> None:
        """Loss on every reference caption, and one generated caption per image."""
        batch = checked_batch(batch)
        if batch is None:
            return
        features = self.encode_batch(batch)
        if batch.tokens.numel():
            self._record_losses(batch, features)
        decoded = generate(self.net.decoder, features, self.vocab, self.generation)
        for image_id, tokens in zip(batch.image_ids.tolist(), decoded.tokens.tolist()):
            self._predictions[image_id] = tokens
        if stage == "val" and batch_idx == 0:
            keep = self.hparams.logged_samples
            images = batch.images[:keep].cpu() if batch.images is not None else [None] * keep  # features: text only
            self._samples = list(zip(batch.image_ids[:keep].tolist(), images))

    def predict_step(self, batch: CaptionBatch | torch.Tensor | None, batch_idx: int) -> list[CaptionResult]:
        """Captions for ``trainer.predict(model, loader)``, decoded as validation decodes (``generation``).

        ``batch``: a ``CaptionBatch`` (this project's data loaders; results carry the ``image_id``, and
        ``file`` names it: "<image id 42>") or a (batch, 3, s, s) tensor of pixels in [0, 1] at the trained
        ``image_size``, as ``build_image_transform`` makes them (named "<batch 3 image 0>"). Pixels of
        another size or range (0..255, say) are refused: the model would caption them, wrongly, without a word.
        """
        batch = checked_batch(batch)
        if batch is None:  # every image of the batch was skipped as unreadable (data.on_bad_image=skip)
            return []
        image_ids = None
        if isinstance(batch, CaptionBatch):
            features = self.encode_batch(batch)
            image_ids = batch.image_ids.tolist()
            names = [f"<image id {image_id}>" for image_id in image_ids]
        elif isinstance(batch, torch.Tensor) and batch.dim() == 4 and batch.shape[1] == 3:
            size, expect = self.hparams.image_size, "build_image_transform(module.hparams.image_size) makes them"
            if size is not None and tuple(batch.shape[2:]) != (size, size):
                raise ValueError(f"predict_step: batch {batch_idx} holds {batch.shape[2]}x{batch.shape[3]} images; "
                                 f"this model was trained at {size}x{size}: {expect}")
            low, high = (batch.min().item(), batch.max().item()) if batch.numel() else (0, 0)
            if not batch.is_floating_point() or not torch.isfinite(batch).all() or low < 0 or high > 1:
                raise ValueError(f"predict_step: batch {batch_idx} holds {batch.dtype} values from {low:g} to "
                                 f"{high:g}; it takes floating-point pixels in [0, 1] (ToTensor's range), as "
                                 f"{expect}: divide 0..255 values by 255")
            features = self.net.encode(batch)
            names = [f"<batch {batch_idx} image {row}>" for row in range(batch.shape[0])]
        else:
            raise TypeError(f"predict_step takes a CaptionBatch or a (batch, 3, H, W) tensor of pixels, got "
                            f"{type(batch).__name__}{'' if not isinstance(batch, torch.Tensor) else tuple(batch.shape)}")
        decoded = generate(self.net.decoder, features, self.vocab, self.generation)
        return CaptionResult.from_decoded(decoded, self.vocab, names, self.generation.n_best, image_ids)

    def _record_losses(self, batch: CaptionBatch, features: PreparedImages) -> None:
        """Each image's summed reference NLL and word count, kept by image id (a DDP sampler's
        padding repeats images; the id counts them once)."""
        output = self.net.decoder(features.select(batch.caption_image_index), batch.tokens, batch.lengths)
        nll, words = caption_negative_log_likelihood(output.word_logits, batch.tokens[:, 1:], self.vocab.pad_id)
        rows = batch.image_ids.shape[0]
        image_nll = nll.new_zeros(rows).index_add_(0, batch.caption_image_index, nll)  # (images,)
        image_words = words.new_zeros(rows).index_add_(0, batch.caption_image_index, words)  # (images,)
        for image_id, total, count in zip(batch.image_ids.tolist(), image_nll.tolist(), image_words.tolist()):
            self._losses[image_id] = (total, count)

    def on_validation_epoch_end(self) -> None:
        self._score_predictions("val")

    def on_test_epoch_end(self) -> None:
        self._score_predictions("test")

    def _score_predictions(self, stage: str) -> None:
        """Gather every rank's captions, score once on rank 0, log the same numbers on all ranks."""
        predictions, losses = gather_predictions(self._predictions), gather_predictions(self._losses)
        self._predictions, self._losses = {}, {}
        if self.trainer.sanity_checking:
            return
        captions = {i: detokenize(self.vocab.decode(tokens)) for i, tokens in sorted(predictions.items())}
        metrics = self._evaluator(stage).score(captions).metrics if self.trainer.is_global_zero else None
        metrics = broadcast_from_rank_zero(metrics)  # float64, as the evaluator computed them
        words = sum(count for _, count in losses.values())
        if words:
            metrics = {"loss": math.fsum(total for total, _ in losses.values()) / words, **metrics}
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, sync_dist=False)
        if stage == "val" and self.trainer.is_global_zero:
            self._log_samples(captions)
        if stage == "test":
            self.test_captions = captions
            self.test_metrics = {f"test/{name}": value for name, value in metrics.items()}

    def _log_samples(self, captions: dict[int, str]) -> None:
        """A few validation images with their generated and reference captions, for TensorBoard."""
        references = self._references("val")
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            for number, (image_id, image) in enumerate(self._samples):
                tag = f"val_samples/{number}"
                if image is not None:
                    logger.experiment.add_image(tag, image, self.global_step)
                lines = [f"**generated:** {captions.get(image_id, '')}", "",
                         *(f"reference: {r}" for r in references.get(image_id, []))]
                logger.experiment.add_text(tag, "  \n".join(lines), self.global_step)

    def _evaluator(self, stage: str) -> CocoCaptionEvaluator:
        if stage not in self._evaluators:
            self._evaluators[stage] = CocoCaptionEvaluator(self._references(stage))
        return self._evaluators[stage]

    def _references(self, stage: str) -> dict[int, list[str]]:
        """The split's reference captions, from the trainer's data module (``ReferenceCaptions``)."""
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ReferenceCaptions):
            raise TypeError(f"scoring {stage} captions needs the reference captions: give the trainer a data module "
                            "with references(split) (CaptionDataModule has it)")
        return datamodule.references(stage)

    def on_train_start(self) -> None:
        self._encoder_identity = None  # weights may have been loaded since: compute it again
        max_epochs = self.trainer.max_epochs
        if self.scst is not None and max_epochs is not None and 0 <= max_epochs <= self.scst.start_epoch:
            log.warning("model.scst.start_epoch=%d is not before trainer.max_epochs=%d: this run trains by "
                        "cross-entropy only", self.scst.start_epoch, max_epochs)

    def on_validation_start(self) -> None:
        self._encoder_identity = None

    def on_test_start(self) -> None:
        self._encoder_identity = None

    def _check_features_from(self, batch: CaptionBatch) -> None:
        """Cached features must come from this very encoder (not from other weights than a checkpoint's, say)."""
        if not self.net.encoder.frozen:
            raise ValueError("the batches carry cached encoder features, but this model's encoder trains: "
                             "set model.encoder.trainable_stages=0 or data.feature_cache=false")
        if self._encoder_identity is None:
            self._encoder_identity = self.net.encoder.cache_identity()
        if batch.features_from != self._encoder_identity:
            raise ValueError("the batches carry features computed by another encoder than this model's (other "
                             "weights, grid or normalisation): compute the feature cache with this model's encoder, "
                             "its final weights loaded")

    def teardown(self, stage: str) -> None:
        for evaluator in self._evaluators.values():
            evaluator.close()
        self._evaluators.clear()

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("no optimizer configured: set model.optimizer (a _partial_ torch.optim class)")
        optimizer = self.optimizer_factory(params=self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor}}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters; the encoder's in their own group when ``encoder_lr`` is set."""
        encoder = [p for p in self.net.encoder.parameters() if p.requires_grad]
        decoder = [p for p in self.net.decoder.parameters() if p.requires_grad]
        if self.hparams.encoder_lr is None:
            return [{"params": encoder + decoder}]
        return [{"params": decoder}, {"params": encoder, "lr": self.hparams.encoder_lr}]

    def init_from(self, checkpoint_path: str | os.PathLike) -> None:
        """Start from a checkpoint's model weights only (a new run: optimizer, scheduler and epoch start afresh).

        The vocabulary and every tensor's name and shape must match; the first mismatch stops with
        a message naming it.
        """
        checkpoint = load_checkpoint(checkpoint_path, "init_from=")  # local file, data only; errors name the file
        where = describe(checkpoint_path, "init_from=")
        check_finite(checkpoint, where)
        saved_vocab = list(checkpoint.get("hyper_parameters", {}).get("vocab") or [])
        if saved_vocab != self.vocab.tokens:
            raise CheckpointMismatchError(f"{where}: {_first_vocab_difference(saved_vocab, self.vocab.tokens)}; use "
                                          "the data config and data.min_word_count the checkpoint was trained with")
        saved, own = checkpoint["state_dict"], self.state_dict()
        other_architecture = "(another encoder or decoder architecture)"
        for name, tensor in own.items():
            if name not in saved:
                raise CheckpointMismatchError(f"{where}: the checkpoint has no tensor {name} {other_architecture}")
            if saved[name].shape != tensor.shape:
                raise CheckpointMismatchError(f"{where}: tensor {name} is {tuple(saved[name].shape)} in the "
                                              f"checkpoint but {tuple(tensor.shape)} in this model")
        extra = sorted(set(saved) - set(own))
        if extra:
            raise CheckpointMismatchError(f"{where}: the checkpoint's tensor {extra[0]} has no place in this model "
                                          f"{other_architecture}")
        self.load_state_dict(saved)
        log.info("initialised the model from %s (weights only)", checkpoint_path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # beside the weights, which words their ids mean: an edited hyper_parameters.vocab is caught on loading
        checkpoint[VOCAB_FINGERPRINT] = self.vocab.fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning read the file (train.py validated it with load_checkpoint first); a diverged run's
        # weights are refused here too, whoever called the trainer
        check_finite(checkpoint, "the checkpoint being restored")
        saved = checkpoint.get("hyper_parameters", {}).get("vocab")
        if saved is not None and list(saved) != self.vocab.tokens:
            raise ValueError(f"{_first_vocab_difference(list(saved), self.vocab.tokens)}: evaluate the checkpoint "
                             "on the data it was trained with (same data config and min_word_count)")


def _first_vocab_difference(saved: list[str], own: list[str]) -> str:
    """Where two vocabularies part, in words."""
    if not saved:
        return "the checkpoint holds no vocabulary"
    for index, (theirs, ours) in enumerate(zip(saved, own)):
        if theirs != ours:
            return f"its vocabulary differs from this run's at id {index} ({theirs!r} there, {ours!r} here)"
    return f"its vocabulary has {len(saved)} words, this run's {len(own)}"
