"""Train and/or evaluate a captioning model: ``python train.py [hydra overrides]``.

``python train.py`` fits the default experiment, then scores the test split with the best
checkpoint; ``python train.py train=false ckpt_path=X`` only scores checkpoint X.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from captioning.schemas import register_schemas

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from captioning.data.datamodule import CaptionDataModule
    from captioning.models.encoders import CNNEncoder
    from captioning.module import CaptioningLitModule

# torch, Lightning and the evaluator are imported inside run(): a mistyped override then fails in
# about a second, before they load
log = logging.getLogger("train")

# frozen encoder stages stay in eval mode on purpose (their BatchNorm statistics must not move)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

# conf/paths resolves the project root (and so data/ and logs/) from this, when the config is composed
os.environ.setdefault("CAPTIONING_ROOT", str(Path(__file__).resolve().parent))


def cluster_run_name(environ: Mapping[str, str]) -> str | None:
    """The run folder's name shared by ranks that a cluster launcher started as separate ``train.py``
    processes (each composes its own config, at its own second): the job's name, known to every rank.

    Inside an ``srun`` step of several tasks that is the SLURM job and step; under torchrun, its
    rendezvous id (``--rdzv-id``; ``--standalone`` draws a fresh one per launch). None elsewhere.
    """
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ:
        return f"slurm-{environ['SLURM_JOB_ID']}.{environ['SLURM_STEP_ID']}"
    if environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{environ['TORCHELASTIC_RUN_ID']}"
    return None


# conf/hydra names each run's folder <date>_<time>_<this tag>: runs started in the same second never share one;
# ranks of one cluster job share the job's name (CAPTIONING_RUN_NAME; set it yourself to choose the name)
os.environ["CAPTIONING_RUN_TAG"] = f"{os.getpid()}-{secrets.token_hex(2)}"
if "CAPTIONING_RUN_NAME" not in os.environ and (shared_name := cluster_run_name(os.environ)) is not None:
    os.environ["CAPTIONING_RUN_NAME"] = shared_name
# the encoder/decoder configs name their schemas (types checked while composing): Hydra must know them first
register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns ``optimized_metric`` (a validation metric, e.g. val/best_CIDEr) for hyperparameter sweepers."""
    from captioning.checkpoints import CheckpointError
    from captioning.config import ConfigError
    from captioning.errors import InputError

    try:
        metrics = run(cfg)
    # a setting's fault (a checkpoint that does not fit it or cannot be read, a learning rate that made
    # training diverge: NonFiniteTrainingError) or the data's (an annotation error, images that cannot be
    # used, a path escaping its dataset folder: InputError): say which
    except (ConfigError, CheckpointError, InputError) as error:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)  # paths stay whole
        sys.exit(2)
    if HydraConfig.get().mode != RunMode.MULTIRUN:  # only a sweeper reads it; train=false validates nothing
        return metrics.get(cfg.optimized_metric)
    return optimized_metric(metrics, cfg.optimized_metric)


def optimized_metric(metrics: dict[str, float], name: str) -> float:
    """The number a sweeper maximises; a name the run did not produce is an error, not a silent None."""
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not produced by this run; it has {sorted(metrics)} "
                       "(val/best_<metric> comes from callbacks.model_checkpoint.monitor)")
    return metrics[name]


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit and/or test as ``cfg`` says; returns the final metrics (also written to metrics.json)."""
    from captioning.checkpoints import check_finite, describe, load_checkpoint
    from captioning.config import check_config
    from captioning.data.files import write_json

    if not cfg.train and not cfg.ckpt_path:
        raise ValueError("train=false needs ckpt_path=<checkpoint to evaluate>")
    if cfg.get("init_from") and cfg.ckpt_path:
        raise ValueError("init_from starts a new run from a checkpoint's weights and ckpt_path resumes one exactly: "
                         "give one of them")
    # read now, not after the data is prepared, and as data only: Lightning reads ckpt_path itself (with
    # weights_only=True, below), but a URL, a pickle that needs code or a damaged file never reaches it
    for key in ("init_from", "ckpt_path"):
        if cfg.get(key):
            checkpoint = load_checkpoint(cfg[key], f"{key}=", lightning=key == "ckpt_path",
                                         resume=key == "ckpt_path" and cfg.train)
            check_finite(checkpoint, describe(cfg[key], f"{key}="))
            del checkpoint
    check_config(cfg)
    import pytorch_lightning as pl

    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    # the frozen encoder whose outputs the feature cache holds, built from the settings alone
    feature_encoder = _feature_encoder(cfg) if cfg.data.get("feature_cache") else None
    datamodule: CaptionDataModule = instantiate(cfg.data, feature_encoder=feature_encoder)
    datamodule.prepare_data()
    model = _build_model(cfg.model, datamodule.vocab.tokens, datamodule.image_size)
    if feature_encoder is not None:
        # the model's encoder takes the weights the features are computed with (a random initialisation
        # cannot be rebuilt from the settings; pretrained and checkpoint weights are the same anyway)
        model.net.encoder.load_state_dict(feature_encoder.state_dict())
        del feature_encoder  # the data side lets go of it once the features are computed
    if cfg.get("init_from"):
        model.init_from(cfg.init_from)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_config = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(run_config, resolve=True))
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "data_splits.json", datamodule.corpus.split_image_ids())

    metrics: dict[str, float] = {}
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        metrics |= _best_validation(trainer)
    if not cfg.test:
        if trainer.is_global_zero:
            write_json(output_dir / "metrics.json", _strict_json(metrics))
        return metrics

    trainer.test(model, datamodule=datamodule, ckpt_path=_checkpoint_to_test(cfg, trainer), weights_only=True)
    metrics = {**_best_validation(trainer), **model.test_metrics}  # the evaluator's float64 numbers
    if trainer.is_global_zero:
        metrics |= _leave_one_out(datamodule.references("test"), model.test_captions)
        write_json(output_dir / "metrics.json", _strict_json(metrics))
        results = [{"image_id": i, "caption": caption} for i, caption in sorted(model.test_captions.items())]
        write_json(output_dir / "test_captions.json", results)
        _print_table(metrics)
        log.info("outputs in %s", output_dir)
    return metrics


def _build_model(model: DictConfig, vocab: list[str], image_size: int) -> CaptioningLitModule:
    """The Lightning module: its encoder and decoder settings stay plain data (stored in checkpoints);
    the optimizer and scheduler nodes become the ``_partial_`` factories it calls in ``configure_optimizers``."""
    scheduler = instantiate(model.scheduler) if model.get("scheduler") else None  # model/scheduler=none: empty
    return instantiate(model, vocab=vocab, image_size=image_size, optimizer=instantiate(model.optimizer),
                       scheduler=scheduler)


def _strict_json(metrics: dict[str, float]) -> dict[str, float | None]:
    """The metrics for metrics.json: a NaN or infinite one (which JSON cannot hold) is written as null, and named."""
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        log.warning("metrics that are not finite numbers, written as null in metrics.json: %s", ", ".join(bad))
    return {name: value if math.isfinite(value) else None for name, value in metrics.items()}


def _best_validation(trainer: pl.Trainer) -> dict[str, float]:
    """``val/best_<metric>``: the best value of the metric that chose the best checkpoint (what sweeps optimise)."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.best_model_score is None or not callback.monitor:
        return {}
    return {f"val/best_{callback.monitor.removeprefix('val/')}": float(callback.best_model_score)}


def _leave_one_out(references: dict[int, list[str]], captions: dict[int, str]) -> dict[str, float]:
    """The model's captions and the human references scored the same way (``CocoCaptionEvaluator.leave_one_out``)."""
    from captioning.evaluation.coco import CocoCaptionEvaluator

    with CocoCaptionEvaluator(references) as evaluator:
        result = evaluator.leave_one_out(captions)
    if result is None:  # no test image has 5 references (logged)
        return {}
    return ({f"human_loo/{name}": value for name, value in result.human.items()}
            | {f"model_loo/{name}": value for name, value in result.model.items()})


def _feature_encoder(cfg: DictConfig) -> CNNEncoder:
    """The frozen encoder that computes the feature cache: the run's ``model.encoder``, with the weights the
    run will use (a checkpoint's, when resuming, evaluating or initialising from one)."""
    from captioning.checkpoints import load_checkpoint, network_state
    from captioning.models.encoder_decoder import build_encoder

    encoder = build_encoder(OmegaConf.to_container(cfg.model.encoder, resolve=True))
    weights_from = cfg.ckpt_path or cfg.get("init_from")
    if weights_from:
        encoder.load_state_dict(network_state(load_checkpoint(weights_from), "encoder"))
    return encoder


def _checkpoint_to_test(cfg: DictConfig, trainer: pl.Trainer) -> str | None:
    """The best checkpoint after fitting; ``ckpt_path`` when only evaluating."""
    if not cfg.train:
        return cfg.ckpt_path
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:
        log.warning("no best checkpoint was saved (no validation?): testing the final weights")
        return None
    return best


def _print_table(metrics: dict[str, float]) -> None:
    from captioning.evaluation.coco import METRICS

    table = Table(title="Test split", caption="leave-one-out: in each of 5 rounds one human reference is the "
                  "candidate and both sides are scored against the image's other references")
    table.add_column("metric")
    table.add_column("model (all references)", justify="right")
    table.add_column("model (leave-one-out)", justify="right")
    table.add_column("human (leave-one-out)", justify="right")
    for name in (*METRICS, "SPICE"):
        if f"test/{name}" in metrics:
            row = [metrics.get(f"{side}/{name}") for side in ("test", "model_loo", "human_loo")]
            table.add_row(name, *(f"{value:.4f}" if value is not None else "-" for value in row))
    Console().print(table)


def explain_unknown_override(argv: list[str]) -> str | None:
    """For an override of a key the config lacks, a message listing the keys that do exist there; for a
    value of the wrong type (a schema's check, ``captioning/schemas.py``), Hydra's words with the setting.

    Hydra's own error says only that the key "is not in struct"; composing the overrides once more
    (a fraction of a second) finds the node and its valid keys. None when the overrides compose.
    """
    overrides = [arg for arg in argv if not arg.startswith("-")]
    if any(arg in ("-m", "--multirun") or arg.startswith("--cfg") for arg in argv):
        return None  # sweeps and config printing go to Hydra untouched
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except ConfigCompositionException as error:
        cause = error.__cause__
        if not getattr(cause, "full_key", None):
            return None
        if isinstance(cause, ValidationError):
            reason = cause.msg.splitlines()[0]  # the rest repeats the key and the schema
            return f"{cause.full_key}: {reason} (its type is fixed by {cause.object_type_str})"
        if not isinstance(cause, ConfigAttributeError | ConfigKeyError):
            return None
        parent_key = cause.full_key.rpartition(".")[0]
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.lstrip("+").startswith(f"{cause.full_key}=")])
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig):
            return None
        valid = ", ".join(sorted(str(key) for key in parent.keys() if not str(key).startswith("_")))
        return (f"unknown setting {cause.full_key!r}. Settings of {parent_key or 'the config'}: {valid}. "
                f"(To add a new key on purpose, write +{cause.full_key}=...)")
    del cfg
    return None


def explain_unwritable_run_dir(argv: list[str]) -> str | None:
    """A message when the folder that will hold the run folder (``hydra.run.dir``) cannot be written, else None.

    Hydra creates the run folder before ``main`` runs and answers a read-only or impossible place with
    a traceback; this finds it first. The run folder itself is not created here (its name holds the
    second Hydra resolves it at), only its parent, as Hydra would.
    """
    if any(arg in ("-m", "--multirun") or arg.startswith(("--cfg", "--help", "-h")) for arg in argv):
        return None
    from hydra import compose, initialize_config_dir

    from captioning.data.files import check_writable
    from captioning.errors import InputError

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[arg for arg in argv if not arg.startswith("-")], return_hydra_config=True)
    run_dir = Path(cfg.hydra.run.dir)
    try:
        check_writable(run_dir.parent, f"hydra.run.dir={run_dir}: its folder", folder=True)
    except InputError as error:
        return str(error)
    return None


if __name__ == "__main__":
    message = explain_unknown_override(sys.argv[1:]) or explain_unwritable_run_dir(sys.argv[1:])
    if message is not None:
        Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # paths stay whole
        sys.exit(2)
    main()
