"""Hydra schemas of the encoder and decoder configs, so Hydra checks their keys and types while composing.

Each ``conf/model/encoder`` / ``conf/model/decoder`` option lists its schema first in its defaults
(``- /schema/decoder/show_attend_tell@_here_``): a mistyped key or a value of the wrong type then
fails at composition with Hydra's message naming it, before torch is imported. The schemas hold
types only (every value ``MISSING``); the YAML files hold the values, the classes their meaning.
This module imports no torch: ``train.py`` registers the schemas before Hydra composes, and so
must any other code that composes ``conf/`` (``register_schemas()``; the tests' conftest does).
"""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class CNNEncoderConfig:
    """``captioning.models.encoders.CNNEncoder``."""

    _target_: str = MISSING
    backbone: str = MISSING
    weights: Optional[str] = MISSING
    weights_path: Optional[str] = MISSING
    grid_size: Optional[int] = MISSING
    trainable_stages: Optional[int] = MISSING


@dataclass
class PrecomputedEncoderConfig:
    """``captioning.models.encoders.PrecomputedEncoder``: no weights, the size of the features it is given."""

    _target_: str = MISSING
    feature_dim: int = MISSING


@dataclass
class DecoderConfig:
    """What every decoder takes (``captioning.models.decoders``)."""

    _target_: str = MISSING
    embed_dim: int = MISSING
    hidden_size: int = MISSING
    dropout: float = MISSING
    tie_embeddings: bool = MISSING
    init_scale: Optional[float] = MISSING


@dataclass
class RecurrentDecoderConfig(DecoderConfig):
    """A decoder of one kind of cell, stacked ``num_layers`` deep."""

    cell: str = MISSING
    num_layers: int = MISSING


@dataclass
class ShowTellDecoderConfig(RecurrentDecoderConfig):
    """``ShowTellDecoder``: how the image vector conditions the RNN."""

    condition: str = MISSING


@dataclass
class ShowAttendTellDecoderConfig(RecurrentDecoderConfig):
    """``ShowAttendTellDecoder``: soft attention over the grid."""

    attention_dim: int = MISSING
    gate: bool = MISSING
    context_encoder: Optional[str] = MISSING
    context_hidden_size: int = MISSING


@dataclass
class UpDownDecoderConfig(DecoderConfig):
    """``UpDownDecoder``: its two cells are LSTMs, one of each kind, so it has no ``cell`` or ``num_layers``."""

    attention_dim: int = MISSING


SCHEMAS = {
    ("schema/encoder", "cnn"): CNNEncoderConfig,
    ("schema/encoder", "precomputed"): PrecomputedEncoderConfig,
    ("schema/decoder", "show_tell"): ShowTellDecoderConfig,
    ("schema/decoder", "show_attend_tell"): ShowAttendTellDecoderConfig,
    ("schema/decoder", "updown"): UpDownDecoderConfig,
}


def register_schemas() -> None:
    """Put the schemas in Hydra's config store (idempotent), where the config files' defaults find them."""
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)
