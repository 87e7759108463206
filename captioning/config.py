"""Fail fast on what Hydra's composition cannot check, naming the setting.

Hydra refuses an override of a key the config lacks, and the encoder/decoder schemas
(``captioning.schemas``) refuse a value of the wrong type while composing. What is left is checked
here, before any data is read: a key *added* with ``+`` (or a typo in a config file) against its
target's signature, an encoder or decoder ``_target_`` that is not a known component, numbers out of
range, the decoding settings, and the optimizer and learning-rate scheduler, built on a dummy parameter.
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
    "trainer.strategy.peer_timeout_s": 0.0,  # trainer=ddp's watchdog (0: off)
    "trainer.strategy.timeout.seconds": 1.0,
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
        from captioning.models.encoder_decoder import DECODERS, ENCODERS, component_class

        for key, known, bound in (("encoder", ENCODERS, set()), ("decoder", DECODERS, {"vocab_size", "encoder_dim"})):
            node = model.get(key) or {}
            try:
                target = component_class(node, known, f"model.{key}")
            except ValueError as error:
                raise ConfigError(str(error)) from None
            accepted = _parameters(target)
            _check(node, None if accepted is None else accepted - bound, f"model.{key}", target.__name__)
        _check_generation(model)
        _check_scst(model)
        _check_precomputed(cfg)


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


def _check_precomputed(cfg: DictConfig) -> None:
    """Precomputed region features (``data.precomputed``) and the weightless ``PrecomputedEncoder`` go together."""
    from captioning.models.encoder_decoder import target_of
    from captioning.models.encoders import PrecomputedEncoder

    served = bool(OmegaConf.select(cfg, "data.precomputed", default=None))
    reads = OmegaConf.select(cfg, "model.encoder._target_", default=None) == target_of(PrecomputedEncoder)
    if served and not reads:
        raise ConfigError("data.precomputed serves region features, but model.encoder is an image encoder: use "
                          "model/encoder=precomputed (model=updown does), or data.precomputed=null to read images")
    if reads and not served:
        raise ConfigError("model.encoder is the precomputed-feature encoder, but data.precomputed is not set: give "
                          "data.precomputed.att_dir (the <image id>.npz region features), or an image encoder")


def _check_scst(model: DictConfig) -> None:
    """``model.scst``, as the module will build it (``ScstSettings``)."""
    if not model.get("scst"):
        return
    from captioning.scst import ScstSettings

    try:
        ScstSettings(**model.scst)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.scst: {error}") from None


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
