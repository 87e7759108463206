"""The captioning network: a CNN encoder feeding a recurrent decoder."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from captioning.models.decoders import DecoderOutput, PreparedImages, ShowAttendTellDecoder, ShowTellDecoder
from captioning.models.encoders import CNNEncoder, EncodedImages

DECODERS: dict[str, type[nn.Module]] = {"show_tell": ShowTellDecoder, "show_attend_tell": ShowAttendTellDecoder}


class EncoderDecoder(nn.Module):
    """Encoder + decoder. ``forward`` is the teacher-forced pass; decoding lives in ``captioning.decoding``."""

    def __init__(self, encoder: CNNEncoder, decoder: nn.Module) -> None:
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

    def encode_cached(self, rows: torch.Tensor) -> PreparedImages:
        """``encode`` for the encoder's cached outputs (``CNNEncoder.feature_rows``), e.g. float16 from disk."""
        return self.decoder.prepare(EncodedImages.from_rows(rows.to(self.encoder.mean.dtype)))


def build_captioner(vocab_size: int, encoder: Mapping[str, Any], decoder: Mapping[str, Any]) -> EncoderDecoder:
    """Build from plain settings (as stored in checkpoints), e.g. ``decoder={"type": "show_tell", ...}``."""
    decoder = dict(decoder)
    kind = decoder.pop("type", "show_tell")
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder type {kind!r}; choose one of {sorted(DECODERS)}")
    cnn = CNNEncoder(**encoder)
    return EncoderDecoder(cnn, DECODERS[kind](vocab_size=vocab_size, encoder_dim=cnn.output_dim, **decoder))
