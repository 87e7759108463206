"""CPU DDP validation: 1 process vs 2 (gloo), to show that gathering captions across ranks costs little.

One seeded model is trained a few steps once on a generated shapes dataset, then validated with
``devices=1`` and with ``devices=2`` (``strategy="ddp"``). Each validation runs in its own
subprocess (``--worker``), because Lightning's DDP launcher starts the other rank by re-running the
same command. Rank 0 times ``trainer.validate`` (which includes launching rank 1 and joining the
process group), the validation loop alone, the epoch end (gather, scoring on rank 0, broadcast),
and the calls to ``gather_predictions`` and ``broadcast_from_rank_zero`` (wrapped with timers by
monkeypatching; before the gather a timed barrier takes out the wait for the slower rank, so the
gather time is the exchange itself). The metrics of both runs must be identical.

Every process gets ``--threads`` torch threads (default 1), so the ratio compares one core with
two, not thread scheduling: left to Lightning (``--threads 0``) the lone process runs 2 threads
and each rank 1, and 2 intra-op threads on a 2-vCPU machine can be far slower than 1. Scoring
(Java METEOR) runs once on rank 0 either way. Prints a table and writes JSON (``--json FILE``).

    python benchmarks/distributed.py --json ddp.json
"""

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

import captioning.module
from captioning.checkpoints import load_data
from captioning.data.build import build_datamodule
from captioning.data.datamodule import CaptionDataModule
from captioning.data.shapes import ShapesConfig, ensure_shapes_dataset
from captioning.evaluation.distributed import broadcast_from_rank_zero, gather_predictions
from captioning.models.decoders import ShowTellDecoder
from captioning.models.encoder_decoder import target_of
from captioning.models.encoders import CNNEncoder
from captioning.module import CaptioningLitModule

CNN = target_of(CNNEncoder)
SHOW_TELL = target_of(ShowTellDecoder)

log = logging.getLogger("benchmarks.distributed")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SPLITS = {split: {"annotations": f"annotations/captions_{split}.json", "images": f"images/{split}"}
          for split in ("train", "val", "test")}
TRAINER_SETTINGS: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                                    "enable_progress_bar": False, "enable_model_summary": False}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=60, help="shapes images to train on")
    parser.add_argument("--val-images", type=int, default=201, help="shapes images validated (odd: rank 1 is padded)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=40, help="steps trained once, so captions are not empty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (OMP_NUM_THREADS); 0: Lightning's choice, cores / processes")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per worker subprocess")
    parser.add_argument("--json", help="write the results here")
    worker = parser.add_argument_group("worker (internal: one training or validation run, in a subprocess)")
    worker.add_argument("--worker", choices=("train", "validate"))
    worker.add_argument("--data-root", type=Path)
    worker.add_argument("--weights", type=Path)
    worker.add_argument("--devices", type=int, default=1)
    worker.add_argument("--result-prefix")
    return parser.parse_args()


class LoopTimer(pl.Callback):
    """Seconds from the start to the end of the validation loop (launch and process-group set-up left out)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


class EpochEndTimer:
    """Timed stand-ins for the module's ``_score_predictions`` and the two collectives it calls."""

    def __init__(self) -> None:
        self.epoch_end_seconds = 0.0
        self.wait_seconds = 0.0
        self.gather_seconds = 0.0
        self.broadcast_seconds = 0.0
        self.local_images = 0
        self.gathered_images = 0

    def patches(self) -> contextlib.ExitStack:
        """Installs the stand-ins until exit (the collectives in ``captioning.module``, where it looks them up)."""
        score_predictions = CaptioningLitModule._score_predictions

        def timed_score_predictions(module: CaptioningLitModule, stage: str) -> None:
            start = time.perf_counter()
            score_predictions(module, stage)
            self.epoch_end_seconds += time.perf_counter() - start

        stack = contextlib.ExitStack()
        stack.enter_context(mock.patch.object(CaptioningLitModule, "_score_predictions", timed_score_predictions))
        stack.enter_context(mock.patch.object(captioning.module, "gather_predictions", self.gather))
        stack.enter_context(mock.patch.object(captioning.module, "broadcast_from_rank_zero", self.broadcast))
        return stack

    def gather(self, local: dict[int, Any]) -> dict[int, Any]:
        """The barrier first absorbs the slower rank's remaining batches, which are not the gather's cost."""
        if dist.is_initialized():
            start = time.perf_counter()
            dist.barrier()
            self.wait_seconds += time.perf_counter() - start
        start = time.perf_counter()
        merged = gather_predictions(local)
        self.gather_seconds += time.perf_counter() - start
        self.local_images, self.gathered_images = len(local), len(merged)
        return merged

    def broadcast(self, value: Any) -> Any:
        start = time.perf_counter()
        result = broadcast_from_rank_zero(value)
        self.broadcast_seconds += time.perf_counter() - start
        return result


def build(args: argparse.Namespace) -> tuple[CaptionDataModule, CaptioningLitModule]:
    """The data (Lightning sets it up) and a small seeded model, built the same way in every run and on every rank."""
    data = build_datamodule(args.data_root, SPLITS, image_size=args.image_size, batch_size=args.batch_size,
                            min_word_count=1)
    pl.seed_everything(args.seed, verbose=False)
    model = CaptioningLitModule(
        data.vocab.tokens, {"_target_": CNN, "backbone": "resnet18"},
        {"_target_": SHOW_TELL, "embed_dim": 16, "hidden_size": 32, "dropout": 0.0}, max_decode_length=8)
    return data, model


def train_worker(args: argparse.Namespace) -> None:
    """Trains once and saves the weights, so both validations score the same non-trivial model."""
    data, model = build(args)
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-2)
    pl.Trainer(max_steps=args.train_steps, limit_val_batches=0, devices=1, **TRAINER_SETTINGS).fit(
        model, datamodule=data)
    torch.save(model.state_dict(), args.weights)


def validate_worker(args: argparse.Namespace) -> None:
    """One validation (rank 0 also launches rank 1); each rank writes its timings and metrics."""
    data, model = build(args)
    model.load_state_dict(load_data(args.weights, "--weights"))  # data only, errors in plain words
    loop, epoch_end = LoopTimer(), EpochEndTimer()
    trainer = pl.Trainer(devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", callbacks=[loop],
                         **TRAINER_SETTINGS)
    with epoch_end.patches():
        start = time.perf_counter()
        trainer.validate(model, datamodule=data, verbose=False)
        validate_seconds = time.perf_counter() - start
    result = {
        "validate_seconds": validate_seconds, "loop_seconds": loop.seconds,
        "epoch_end_seconds": epoch_end.epoch_end_seconds, "wait_seconds": epoch_end.wait_seconds,
        "gather_seconds": epoch_end.gather_seconds, "broadcast_seconds": epoch_end.broadcast_seconds,
        "local_images": epoch_end.local_images, "gathered_images": epoch_end.gathered_images,
        "torch_threads": torch.get_num_threads(),
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
    }
    Path(f"{args.result_prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


def run_worker(args: argparse.Namespace, mode: str, data_root: Path, weights: Path,
               *options: str) -> float:
    """Runs this script as a worker; returns its wall time, Python start-up and every rank included."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--data-root", str(data_root),
               "--weights", str(weights), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), *options]
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    start = time.perf_counter()
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.timeout,
                               cwd=PROJECT_ROOT, env=env)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"worker {mode} {' '.join(options)} failed:\n{completed.stderr[-3000:]}")
    return seconds


def validate(args: argparse.Namespace, data_root: Path, weights: Path, devices: int,
             workdir: Path) -> tuple[list[dict[str, Any]], float]:
    """Every rank's result, and the subprocess's wall time."""
    prefix = workdir / f"devices{devices}"
    log.info("validating %d images with %d process(es)", args.val_images, devices)
    seconds = run_worker(args, "validate", data_root, weights, "--devices", str(devices),
                         "--result-prefix", str(prefix))
    return [json.loads(Path(f"{prefix}.rank{rank}.json").read_text()) for rank in range(devices)], seconds


def report(args: argparse.Namespace, single: dict[str, Any], ranks: list[dict[str, Any]],
           single_process_s: float, ddp_process_s: float) -> dict[str, Any]:
    """Prints the table and returns the JSON record."""
    rank0 = ranks[0]
    scored = [name for name in single["metrics"] if name != "val/loss"]  # the loss counts rank 1's padding
    identical = all(rank["metrics"][name] == single["metrics"][name] for rank in ranks for name in scored)
    ratio = rank0["validate_seconds"] / single["validate_seconds"]
    loop_ratio = rank0["loop_seconds"] / single["loop_seconds"]
    gather_s = rank0["gather_seconds"] + rank0["broadcast_seconds"]
    table = Table(title=f"CPU validation of {args.val_images} shapes images, batch {args.batch_size}")
    for column in ("measure (rank 0)", "1 process", "2 processes", "2 / 1"):
        table.add_column(column, justify="right")
    seconds = (("subprocess s (start-up included)", single_process_s, ddp_process_s),
               ("trainer.validate s", single["validate_seconds"], rank0["validate_seconds"]),
               ("validation loop s", single["loop_seconds"], rank0["loop_seconds"]),
               ("epoch end s (gather, score, broadcast)", single["epoch_end_seconds"], rank0["epoch_end_seconds"]))
    for name, one, two in seconds:
        table.add_row(name, f"{one:.2f}", f"{two:.2f}", f"{two / one:.2f}")
    for name, key in (("wait for slower rank ms", "wait_seconds"), ("gather_predictions ms", "gather_seconds"),
                      ("broadcast_from_rank_zero ms", "broadcast_seconds")):
        table.add_row(name, f"{single[key] * 1e3:.2f}", f"{rank0[key] * 1e3:.2f}", "")
    table.add_row("captions: own -> gathered", f"{single['local_images']} -> {single['gathered_images']}",
                  f"{rank0['local_images']} -> {rank0['gathered_images']}", "")
    table.add_row("torch threads per process", str(single["torch_threads"]), str(rank0["torch_threads"]), "")
    table.add_row("CIDEr", f"{single['metrics']['val/CIDEr']:.6f}", f"{rank0['metrics']['val/CIDEr']:.6f}", "")
    console = Console()
    console.print(table)
    console.print(f"gather + broadcast: {gather_s * 1e3:.2f} ms ({gather_s / rank0['loop_seconds']:.2%} of the "
                  f"2-process validation loop); identical metrics: {identical}")
    return {
        "train_images": args.train_images, "val_images": args.val_images, "image_size": args.image_size,
        "batch_size": args.batch_size, "train_steps": args.train_steps, "seed": args.seed,
        "torch_threads_1_process": single["torch_threads"], "torch_threads_2_processes": rank0["torch_threads"],
        "validation_seconds_1_process": single["validate_seconds"],
        "validation_seconds_2_processes": rank0["validate_seconds"],
        "loop_seconds_1_process": single["loop_seconds"], "loop_seconds_2_processes": rank0["loop_seconds"],
        "epoch_end_seconds_1_process": single["epoch_end_seconds"],
        "epoch_end_seconds_2_processes": rank0["epoch_end_seconds"],
        "subprocess_seconds_1_process": single_process_s, "subprocess_seconds_2_processes": ddp_process_s,
        "gather_seconds": gather_s, "gather_predictions_seconds": rank0["gather_seconds"],
        "broadcast_seconds": rank0["broadcast_seconds"], "wait_for_slower_rank_seconds": rank0["wait_seconds"],
        "gather_seconds_1_process": single["gather_seconds"] + single["broadcast_seconds"],
        "two_vs_one_process_ratio": ratio, "two_vs_one_process_loop_ratio": loop_ratio,
        "identical_metrics": identical, "metrics_1_process": single["metrics"],
        "metrics_2_processes": [rank["metrics"] for rank in ranks],
    }


def main() -> None:
    args = parse_args()
    workers: dict[str, Callable[[argparse.Namespace], None]] = {"train": train_worker, "validate": validate_worker}
    if args.worker:
        workers[args.worker](args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        config = ShapesConfig(num_train=args.train_images, num_val=args.val_images, num_test=2,
                              image_size=args.image_size, seed=args.seed)
        data_root = ensure_shapes_dataset(work / "shapes", config)
        weights = work / "weights.pt"
        log.info("training %d steps once (the weights both validations load)", args.train_steps)
        run_worker(args, "train", data_root, weights, "--train-steps", str(args.train_steps))
        (single,), single_process_s = validate(args, data_root, weights, 1, work)
        ranks, ddp_process_s = validate(args, data_root, weights, 2, work)
    record = report(args, single, ranks, single_process_s, ddp_process_s)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
