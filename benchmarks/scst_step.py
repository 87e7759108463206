"""The CIDEr-D reward's share of a self-critical training step, on the shapes preset's real model.

Composes ``experiment=shapes_scst`` (the default Show-Attend-Tell model, 5 samples per image, the
mean baseline), generates a small shapes dataset, then times ``--steps`` training steps (sampling
with gradients, reward, loss, backward, optimizer step) on batches of ``--batch-size`` images, and
the time spent in ``CiderD.scores`` inside them. The issue's target: the reward at most 25% of a step.
Prints a table and writes JSON (``--json FILE``).

    python benchmarks/scst_step.py --steps 10 --json scst_step.json
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table

from captioning.evaluation.cider_reward import CiderD
from captioning.module import END_TOKEN
from captioning.schemas import register_schemas

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed SCST steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--samples", type=int, default=5, help="samples per image")
    parser.add_argument("--baseline", default="mean", choices=("mean", "greedy"))
    parser.add_argument("--train-images", type=int, default=300, help="shapes training images (the reward's df)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    register_schemas()
    with tempfile.TemporaryDirectory() as folder, \
            initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=shapes_scst", f"paths.data_dir={folder}", f"paths.cache_dir={folder}/cache",
            f"data.generate_shapes.num_train={args.train_images}", "data.generate_shapes.num_val=10",
            "data.generate_shapes.num_test=10", f"data.batch_size={args.batch_size}",
            f"model.scst.samples={args.samples}", f"model.scst.baseline={args.baseline}"])
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        model = instantiate(cfg.model, vocab=datamodule.vocab.tokens, image_size=datamodule.image_size)
        datamodule.setup()
        optimizer = instantiate(cfg.model.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
        batches = iter(datamodule.train_dataloader())
        model.log_dict = lambda *a, **k: None  # no trainer to log to

        def step() -> None:
            loss = model._self_critical_step(next(batches))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        model.train()
        setup_start = time.perf_counter()
        model._reward = CiderD(datamodule.references("train"), end_token=END_TOKEN)  # as the first SCST step does
        reward_setup = time.perf_counter() - setup_start
        step()  # warm-up
        reward_seconds = 0.0
        scores = model._reward.scores

        def timed_scores(*a: object) -> object:
            nonlocal reward_seconds
            start = time.perf_counter()
            result = scores(*a)
            reward_seconds += time.perf_counter() - start
            return result

        model._reward.scores = timed_scores
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        total = time.perf_counter() - start
    result = {"steps": args.steps, "images_per_step": args.batch_size, "samples": args.samples,
              "baseline": args.baseline, "seconds_per_step": total / args.steps,
              "reward_seconds_per_step": reward_seconds / args.steps, "reward_share": reward_seconds / total,
              "reward_setup_seconds": reward_setup, "train_images": args.train_images,
              "threads": args.threads, "torch": torch.__version__, "machine": platform.machine()}
    table = Table(title=f"SCST step ({args.batch_size} images x {args.samples} samples, {args.baseline} baseline)")
    table.add_column("seconds per step", justify="right")
    table.add_column("reward (s)", justify="right")
    table.add_column("reward share", justify="right")
    table.add_row(f"{result['seconds_per_step']:.3f}", f"{result['reward_seconds_per_step']:.4f}",
                  f"{100 * result['reward_share']:.1f}%")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
