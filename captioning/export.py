"""``captioning export``: a checkpoint as ONNX graphs, JSON settings and safetensors weights, for deployment.

    captioning export --checkpoint best.ckpt --output exported/
    caption photos/ --onnx exported/            # the same captions, with onnxruntime instead of PyTorch

The folder holds

- ``encoder.onnx``: images (batch, 3, size, size) in [0, 1] -> the prepared images (the encoder's
  outputs with the decoder's per-image work done: ``EncoderDecoder.encode``);
- ``init_state.onnx``: prepared images -> the decoder's first state;
- ``step.onnx``: one decoder step (tokens, state, prepared images -> logits, state, attention);
- ``vocab.json`` and ``settings.json``: the vocabulary, the input size, the decoding settings of the
  run, the model settings and each graph's input and output names;
- ``weights.safetensors``: every weight, with no code and no pickle: the file to share.

The search itself (greedy, beam, n-best, trigram blocking) is not exported: ``captioning.onnx_runtime``
drives the graphs through the project's one ``decoding.generate``, so both runtimes decode alike.
Every batch size works (the batch axis is dynamic); the image size is the run's.
"""

import argparse
import logging
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from captioning.caption import Captioner
from captioning.checkpoints import VOCAB_FINGERPRINT
from captioning.data.files import check_writable, replace_directory, write_json, writing_alone
from captioning.decoding import HPARAM_FIELDS
from captioning.errors import InputError
from captioning.models.decoders import PreparedImages, State
from captioning.models.encoder_decoder import EncoderDecoder

log = logging.getLogger(__name__)

FORMAT = "captioning-onnx"
FORMAT_VERSION = 1
SETTINGS_FILE, VOCAB_FILE, WEIGHTS_FILE = "settings.json", "vocab.json", "weights.safetensors"
GRAPH_FILES = {"encoder": "encoder.onnx", "init_state": "init_state.onnx", "step": "step.onnx"}
OPSET = 18
# example sizes for tracing: none may equal another dimension, or the exporter would tie them together
_EXAMPLE_BATCH = 7


def prepared_fields(prepared: PreparedImages) -> list[str]:
    """The ``PreparedImages`` fields a model fills (the graphs pass only those), in declaration order."""
    return [item.name for item in fields(PreparedImages) if getattr(prepared, item.name) is not None]


class _EncoderGraph(nn.Module):
    """images -> the prepared images' tensors (``EncoderDecoder.encode``, flattened for ONNX)."""

    def __init__(self, model: EncoderDecoder, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prepared = self.model.encode(images)
        return tuple(getattr(prepared, name) for name in self.names)


class _InitStateGraph(nn.Module):
    """prepared images' tensors -> the decoder's first state, one tensor per part ((layers, batch, hidden))."""

    def __init__(self, model: EncoderDecoder, names: list[str]) -> None:
        super().__init__()
        self.decoder, self.names = model.decoder, names

    def forward(self, *prepared: torch.Tensor) -> State:
        return tuple(self.decoder.init_state(PreparedImages(**dict(zip(self.names, prepared)))))


class _StepGraph(nn.Module):
    """tokens (batch,), state parts, prepared tensors -> logits (batch, vocab), new state parts[, attention]."""

    def __init__(self, model: EncoderDecoder, names: list[str], state_parts: int) -> None:
        super().__init__()
        self.decoder, self.names, self.state_parts = model.decoder, names, state_parts

    def forward(self, tokens: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state, prepared = tensors[:self.state_parts], tensors[self.state_parts:]
        logits, state, weights = self.decoder.step(tokens, state, PreparedImages(**dict(zip(self.names, prepared))))
        return (logits, *state) if weights is None else (logits, *state, weights)


def _export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], dynamic_shapes: tuple[Any, ...], path: Path) -> None:
    """Export ``module`` via torch.export; ``dynamic_shapes`` follows ``forward``'s signature (varargs: a tuple)."""
    with warnings.catch_warnings():  # the exporter's notes on its own internals say nothing to the user
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET,
                                    external_data=False, verbose=False)
    program.save(str(path))


def export_model(checkpoint: Path, output: Path) -> dict[str, Any]:
    """Write the export folder ``output`` (see the module's docstring); returns its settings.

    The folder is written beside ``output`` first and renamed into place, so ``output`` is either the
    old export or the whole new one. An existing ``output`` must be empty or an earlier export; it is
    checked, and held against a second export to it, before the checkpoint is read.
    """
    output = output.resolve()  # "." or "x/.." names no folder to write beside; resolved, it does
    _check_output(output)
    with writing_alone(output, "--output"):  # a second export to it stops here, before its work
        return _export(Captioner.from_checkpoint(checkpoint, device="cpu"), checkpoint, output)


def _export(captioner: Captioner, checkpoint: Path, output: Path) -> dict[str, Any]:
    """``export_model`` once ``output`` is checked and held."""
    settings = captioner.hyper_parameters
    model = captioner.model.eval()
    size = captioner.image_size
    images = torch.rand(_EXAMPLE_BATCH, 3, size, size)  # (batch, 3, size, size) pixels in [0, 1]
    with torch.no_grad():
        prepared = model.encode(images)
        names = prepared_fields(prepared)
        # distinct tensors: the exporter would feed one graph input to parts that alias (an all-zero (h, c))
        state = tuple(part.clone() for part in model.decoder.init_state(prepared))
        tokens = torch.full((_EXAMPLE_BATCH,), captioner.vocab.bos_id, dtype=torch.long)
        attention = model.decoder.step(tokens, state, prepared)[2] is not None
    state_names = [f"state_{i}" for i in range(len(state))]
    new_state_names = [f"new_state_{i}" for i in range(len(state))]
    prepared_tensors = tuple(getattr(prepared, name) for name in names)
    graphs = {
        "encoder": {"inputs": ["images"], "outputs": names},
        "init_state": {"inputs": names, "outputs": state_names},
        "step": {"inputs": ["tokens", *state_names, *names],
                 "outputs": ["logits", *new_state_names, *(["attention"] if attention else [])]},
    }
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()  # the umask's permissions, as the folder a user makes (mkdtemp's would be private)
    try:
        log.info("exporting the encoder")
        batch = {0: torch.export.Dim("batch", min=1)}  # the batch axis of an input (state parts: axis 1)
        per_row = {1: batch[0]}
        _export_graph(_EncoderGraph(model, names), (images,), **_names(graphs["encoder"]), dynamic_shapes=(batch,),
                      path=staging / GRAPH_FILES["encoder"])
        log.info("exporting the decoder's first state and step")
        _export_graph(_InitStateGraph(model, names), prepared_tensors, **_names(graphs["init_state"]),
                      dynamic_shapes=((batch,) * len(names),), path=staging / GRAPH_FILES["init_state"])
        _export_graph(_StepGraph(model, names, len(state)), (tokens, *state, *prepared_tensors),
                      **_names(graphs["step"]), dynamic_shapes=(batch, (*[per_row] * len(state), *[batch] * len(names))),
                      path=staging / GRAPH_FILES["step"])
        save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT, "source": checkpoint.name})
        (staging / WEIGHTS_FILE).chmod(staging.stat().st_mode & 0o666)  # safetensors writes it private (0600)
        exported = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "source": checkpoint.name,
            VOCAB_FINGERPRINT: captioner.vocab.fingerprint,  # vocab.json is checked against it on loading
            # the weights file holds every weight: building the encoder must load (or download) none
            "image_size": size, "encoder": {**settings["encoder"], "weights": None, "weights_path": None},
            "decoder": settings["decoder"],
            # the run's decoding, as a checkpoint stores it (GenerationSettings.from_hparams reads it back)
            "generation": {key: settings[key] for key in HPARAM_FIELDS if settings.get(key) is not None},
            "prepared": names, "state_parts": len(state), "attention": attention, "graphs": graphs,
        }
        write_json(staging / VOCAB_FILE, captioner.vocab.tokens)
        write_json(staging / SETTINGS_FILE, exported)
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # output is untouched
        raise
    return exported


def _names(graph: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"input_names": graph["inputs"], "output_names": graph["outputs"]}


def _check_output(output: Path) -> None:
    """Refuse an output that cannot be written (its folder is missing rights, or is a file), or a folder that holds
    something other than an earlier export; ``output`` is resolved (it has a name and a parent folder)."""
    if not output.name:
        raise InputError(f"--output {output} is the root folder; give a folder to write (it is created if missing)")
    check_writable(output.parent, f"--output {output}: its folder", folder=True)  # the export is written there first
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file; give a folder (it is created if missing)")
    if output.is_dir() and any(output.iterdir()) and not (output / SETTINGS_FILE).is_file():
        raise InputError(f"--output {output} is a folder that holds other files (no {SETTINGS_FILE} of an earlier "
                         "export): give a new or empty folder, so nothing of yours is replaced")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="captioning export",
        description="Export a checkpoint as ONNX graphs (encoder, first state, one decoder step), its vocabulary and "
                    "settings as JSON, and its weights as safetensors; caption with it by `caption IMAGES --onnx DIR`.",
        epilog="exit status: 0 exported; 2 usage or input error (nothing was written)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py")
    parser.add_argument("--output", required=True, type=Path, help="the folder to write (new, empty, or an earlier "
                                                                   "export, which is replaced)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("captioning").setLevel(logging.INFO)  # this tool's progress, not the exporter's chatter
    args = parse_args(argv)
    try:
        exported = export_model(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError) as error:  # CheckpointError and InputError are ValueErrors
        print(f"captioning export: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.output} ({', '.join(GRAPH_FILES.values())}, {VOCAB_FILE}, "
          f"{SETTINGS_FILE}, {WEIGHTS_FILE}; attention: {exported['attention']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
