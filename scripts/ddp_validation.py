"""Validate one seeded model on a shapes dataset with N CPU processes (DDP, gloo); write each rank's metrics.

Run by tests/test_distributed.py as a script, because Lightning's DDP launcher starts the other
ranks by running the same command again:

    python scripts/ddp_validation.py DATA_ROOT OUTPUT_PREFIX --weights W.pt [--train-steps N] --devices 2

With ``--train-steps`` it first trains that many steps (one process) and saves the weights to
``--weights``; without, it loads them, so that every run validates the same model.
"""

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from captioning.checkpoints import load_data
from captioning.data.build import build_datamodule
from captioning.models.decoders import ShowTellDecoder
from captioning.models.encoder_decoder import target_of
from captioning.models.encoders import CNNEncoder
from captioning.module import CaptioningLitModule

CNN = target_of(CNNEncoder)
SHOW_TELL = target_of(ShowTellDecoder)

SPLITS = {split: {"annotations": f"annotations/captions_{split}.json", "images": f"images/{split}"}
          for split in ("train", "val", "test")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_root", type=Path)
    parser.add_argument("output_prefix")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    data = build_datamodule(args.data_root, SPLITS, image_size=64, batch_size=3, min_word_count=1)
    pl.seed_everything(0)
    model = CaptioningLitModule(
        data.vocab.tokens, {"_target_": CNN, "backbone": "resnet18"},
        {"_target_": SHOW_TELL, "embed_dim": 16, "hidden_size": 32, "dropout": 0.0}, max_decode_length=8)
    settings = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}
    if args.train_steps:
        model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e-2)
        pl.Trainer(max_steps=args.train_steps, limit_val_batches=0, devices=1, **settings).fit(model, datamodule=data)
        torch.save(model.state_dict(), args.weights)
    model.load_state_dict(load_data(args.weights, "--weights"))
    trainer = pl.Trainer(devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", **settings)
    trainer.validate(model, datamodule=data, verbose=False)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    Path(f"{args.output_prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
