"""Fail fast on settings no component accepts, listing the ones it does.

Hydra refuses an override of a key the config lacks; a key *added* with ``+`` (or a typo in a
config file) would otherwise only fail deep inside ``instantiate``, after data preparation. This
checks every instantiated node against its target's signature, and builds the optimizer and the
learning-rate scheduler on a dummy parameter, before anything runs.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# numbers a user sets, with their lowest valid value: checked before anything runs, naming the key
# (the components check them too, but only after minutes of data preparation)
LOWEST: dict[str, int | float] = {
    "data.batch_size": 1,
    "data.image_size": 32,  # smaller leaves a CNN no feature map
    "data.num_workers": 0,
    "data.min_word_count": 1,
    "data.max_caption_length": 1,
    "model.optimizer.lr": 0.0,
    "model.encoder_lr": 0.0,
    "trainer.max_epochs": -1,
}


class ConfigError(ValueError):
    """A setting that no component accepts."""


class CheckpointMismatchError(ConfigError):
    """A checkpoint (``init_from``) that does not fit the configured model or this run's vocabulary."""


def _parameters(target: Callable[..., Any]) -> set[str] | None:
    """Named parameters of ``target``; None when it takes ``**kwargs`` (anything goes)."""
    signature = inspect.signature(target)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _check(node: Mapping[str, Any], accepted: set[str] | None, where: str, owner: str) -> None:
    if accepted is None:
        return
    unknown = sorted(set(node) - HYDRA_KEYS - accepted)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a setting of {owner}; valid settings: "
                          f"{', '.join(sorted(accepted - {'self'}))}")


def check_config(cfg: DictConfig, sections: tuple[str, ...] = ("data", "model", "trainer")) -> None:
    """Raise ``ConfigError`` for any key of an instantiated section its target does not accept.

    The optimizer and scheduler come first: they need torch alone, so their errors come in about
    two seconds; the sections' targets import Lightning, torchvision and the models.
    """
    _check_numbers(cfg)
    model = cfg.get("model")
    if model is not None:
        _check_optimization(model)
    for section in sections:
        node = cfg.get(section)
        if node is None or "_target_" not in node:
            continue
        target = get_method(node["_target_"])
        _check(node, _parameters(target), section, node["_target_"])
    if model is not None:
        from captioning.models.captioner import DECODERS
        from captioning.models.encoders import CNNEncoder

        _check(model.get("encoder") or {}, _parameters(CNNEncoder), "model.encoder", "CNNEncoder")
        decoder = dict(model.get("decoder") or {})
        kind = decoder.pop("type", "show_tell")
        if kind not in DECODERS:
            raise ConfigError(f"model.decoder.type {kind!r} is unknown; choose one of {sorted(DECODERS)}")
        accepted = _parameters(DECODERS[kind])
        _check(decoder, None if accepted is None else accepted - {"vocab_size", "encoder_dim"}, "model.decoder",
               DECODERS[kind].__name__)
        _check_generation(model)


def _check_numbers(cfg: DictConfig) -> None:
    """Every ``LOWEST`` setting present is a number at or above its lowest valid value."""
    for key, lowest in LOWEST.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        kind = "an integer" if isinstance(lowest, int) else "a number"
        wrong_type = isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(lowest, int) and not isinstance(value, int))
        if wrong_type or value < lowest:
            raise ConfigError(f"{key} must be {kind} >= {lowest}, got {value!r}")


def _check_generation(model: DictConfig) -> None:
    """The validation/test decoding settings, as the module will build them (``GenerationSettings``)."""
    from captioning.decoding import GenerationSettings

    try:
        GenerationSettings.from_hparams(model)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the decoding settings model.beam_size / max_decode_length / length_penalty / "
                          f"block_trigrams / allow_unk: {error}") from None


def _check_optimization(model: DictConfig) -> None:
    """Build ``model.optimizer`` and ``model.scheduler`` on a dummy parameter: a wrong key or value
    (an argument of another scheduler, a negative learning rate) fails here, not after data preparation."""
    optimizer_node, scheduler_node = model.get("optimizer"), model.get("scheduler")
    if not optimizer_node:
        raise ConfigError("model.optimizer is not set: choose one with model/optimizer=adam (or adamw, sgd)")
    for key, node in (("model.optimizer", optimizer_node), ("model.scheduler", scheduler_node)):
        if node and "_target_" in node:
            accepted = _parameters(get_method(node["_target_"]))
            _check(node, None if accepted is None else accepted - {"params", "optimizer"}, key, node["_target_"])
    try:
        optimizer = instantiate(optimizer_node)(params=[torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.optimizer ({_settings(optimizer_node)}) cannot be built: {error}") from None
    if not scheduler_node:
        return
    try:
        instantiate(scheduler_node)(optimizer=optimizer)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.scheduler ({_settings(scheduler_node)}) cannot be built: {error}") from None


def _settings(node: DictConfig) -> str:
    """``Target(key=value, ...)``: the values a user set, so a refused one can be found."""
    values = ", ".join(f"{key}={node[key]}" for key in node if key not in HYDRA_KEYS)
    return f"{node.get('_target_')}({values})"
