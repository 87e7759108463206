"""The captioning network: a CNN encoder (or precomputed features) feeding a recurrent decoder, built from
plain settings."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from captioning.models.decoders import (
    DecoderOutput,
    PreparedImages,
    ShowAttendTellDecoder,
    ShowTellDecoder,
    UpDownDecoder,
)
from captioning.models.encoders import CNNEncoder, EncodedImages, PrecomputedEncoder


def target_of(cls: type) -> str:
    """The ``_target_`` that names ``cls`` in a config (its import path)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _by_target(*classes: type[nn.Module]) -> dict[str, type[nn.Module]]:
    return {target_of(cls): cls for cls in classes}


# The classes a model may be built from, by their ``_target_``. A checkpoint is data: settings read
# from one can only name these, never import code. A new encoder or decoder is added here.
ENCODERS = _by_target(CNNEncoder, PrecomputedEncoder)
DECODERS = _by_target(ShowTellDecoder, ShowAttendTellDecoder, UpDownDecoder)


class EncoderDecoder(nn.Module):
    """Encoder + decoder. ``forward`` is the teacher-forced pass; decoding lives in ``captioning.decoding``."""

    def __init__(self, encoder: CNNEncoder | PrecomputedEncoder, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                caption_image_index: torch.Tensor) -> DecoderOutput:
        """Teacher-forced logits (num_captions, max_len - 1, vocab) for ``tokens[:, 1:]``.

        Each image is encoded (and prepared for the decoder) once, then shared by its captions.
        """
        return self.decoder(self.encode(images).select(caption_image_index), tokens, lengths)

    def encode(self, images: torch.Tensor) -> PreparedImages:
        """Encoder outputs with the decoder's per-image work done: ready for ``step`` and decoding."""
        return self.decoder.prepare(self.encoder(images))

    def encode_cached(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> PreparedImages:
        """``encode`` for the encoder's cached outputs (``CNNEncoder.feature_rows``) or precomputed region
        features (``cached_outputs``)."""
        return self.decoder.prepare(self.cached_outputs(rows, mask))

    def cached_outputs(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> EncodedImages:
        """Encoder outputs read from disk (e.g. float16), in the decoder's dtype: rows (batch, 1 + num_regions,
        dim), global vector first; ``mask`` (batch, num_regions) bool, True for real regions (None: all real)."""
        dtype = next(self.decoder.parameters()).dtype  # the encoder may have no tensors (PrecomputedEncoder)
        return EncodedImages.from_rows(rows.to(dtype), mask)


def component_class(settings: Mapping[str, Any], known: Mapping[str, type[nn.Module]], where: str) -> type[nn.Module]:
    """The class ``settings["_target_"]`` names, which must be one of ``known``; ``where`` names the setting."""
    target = settings.get("_target_")
    if target not in known:
        raise ValueError(f"{where}._target_ is {target!r}, which is not a known component: one of {sorted(known)} "
                         "(models are built only from these; a new class is added to ENCODERS or DECODERS in "
                         "captioning/models/encoder_decoder.py)")
    return known[target]


def component_arguments(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a component's settings: every key but Hydra's ``_target_`` and friends."""
    return {key: value for key, value in settings.items() if not key.startswith("_")}


def build_encoder(settings: Mapping[str, Any]) -> CNNEncoder | PrecomputedEncoder:
    """The encoder of plain settings (``conf/model/encoder``, as stored in checkpoints)."""
    return component_class(settings, ENCODERS, "model.encoder")(**component_arguments(settings))


def build_encoder_decoder(vocab_size: int, encoder: Mapping[str, Any], decoder: Mapping[str, Any]) -> EncoderDecoder:
    """Build from plain settings (``conf/model/encoder``, ``conf/model/decoder``, as stored in checkpoints),
    e.g. ``decoder={"_target_": "captioning.models.decoders.ShowTellDecoder", "hidden_size": 512, ...}``."""
    cnn = build_encoder(encoder)
    decoder_class = component_class(decoder, DECODERS, "model.decoder")
    return EncoderDecoder(cnn, decoder_class(vocab_size=vocab_size, encoder_dim=cnn.output_dim,
                                             **component_arguments(decoder)))
