"""Captioning with an export folder (``captioning export``) on onnxruntime, with no PyTorch model.

The graphs stand in for the model behind the same interfaces: ``OnnxDecoder`` is a
``CaptionDecoder`` whose ``init_state`` and ``step`` run ``init_state.onnx`` and ``step.onnx``,
and ``OnnxEncoderDecoder.encode`` runs ``encoder.onnx``. So ``Captioner`` (image loading, the
project's one ``decoding.generate`` for greedy and beam search, n-best lists, attention) works
unchanged on top of them, and the ONNX captions can only differ from the checkpoint's where the
two runtimes' float arithmetic does.

    from captioning.onnx_runtime import onnx_captioner
    results = onnx_captioner("exported/").caption(["photo.jpg"])
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from captioning.caption import Captioner, check_image_size, generation_settings
from captioning.checkpoints import EDITED, VOCAB_FINGERPRINT, CheckpointError, check_fields, saved_vocabulary
from captioning.data.vocab import Vocabulary
from captioning.decoding import HPARAM_FIELDS
from captioning.export import FORMAT, FORMAT_VERSION, GRAPH_FILES, SETTINGS_FILE, VOCAB_FILE
from captioning.models.decoders import DecoderOutput, PreparedImages, State
from captioning.models.encoders import EncodedImages

# what captioning reads of settings.json besides format, image_size and the vocabulary's fingerprint
SETTINGS_FIELDS = {"generation": dict, "prepared": list[str], "attention": bool,
                   "graphs": {"init_state": {"outputs": list[str]}}}


class OnnxGraph:
    """One exported graph on onnxruntime's CPU provider: named torch tensors in, named torch tensors out."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a bad or missing file
            raise ValueError(f"{path} cannot be loaded as an ONNX graph: {error}") from None
        # the exporter drops inputs a graph does not read (e.g. the image vector of a step that never uses it)
        self.inputs = {node.name for node in self.session.get_inputs()}
        self.outputs = [node.name for node in self.session.get_outputs()]

    def __call__(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {name: tensor.detach().cpu().numpy() for name, tensor in tensors.items() if name in self.inputs}
        return {name: torch.from_numpy(np.asarray(value))
                for name, value in zip(self.outputs, self.session.run(self.outputs, feed))}


class OnnxDecoder:
    """The ``CaptionDecoder`` step interface over ``init_state.onnx`` and ``step.onnx``."""

    def __init__(self, init_state: OnnxGraph, step: OnnxGraph, settings: Mapping[str, Any]) -> None:
        self.init_graph, self.step_graph = init_state, step
        self.prepared_names: list[str] = settings["prepared"]
        self.state_names: list[str] = settings["graphs"]["init_state"]["outputs"]
        self.attention = bool(settings["attention"])

    def prepare(self, features: EncodedImages | PreparedImages) -> PreparedImages:
        """``encoder.onnx`` already did the decoder's per-image work: only its output is accepted."""
        if not isinstance(features, PreparedImages):
            raise TypeError("an exported decoder takes the prepared images of its encoder.onnx (OnnxEncoderDecoder."
                            "encode), not raw encoder outputs")
        return features

    def init_state(self, features: PreparedImages) -> State:
        outputs = self.init_graph(**self._prepared(features))
        return tuple(outputs[name] for name in self.state_names)  # each (layers, batch, hidden_size)

    def step(self, tokens: torch.Tensor, state: State, features: PreparedImages
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """tokens (batch,) -> logits (batch, vocab_size), the new state, attention (batch, num_pixels) or None."""
        outputs = self.step_graph(tokens=tokens.long(), **dict(zip(self.state_names, state)),
                                  **self._prepared(features))
        new_state = tuple(outputs[f"new_{name}"] for name in self.state_names)
        return outputs["logits"], new_state, outputs["attention"] if self.attention else None

    def forward(self, features: EncodedImages | PreparedImages, tokens: torch.Tensor,
                lengths: torch.Tensor) -> DecoderOutput:
        raise NotImplementedError("an exported model only generates (one step at a time); teacher-forced training "
                                  "needs the checkpoint")

    def _prepared(self, features: PreparedImages) -> dict[str, torch.Tensor]:
        return {name: getattr(features, name) for name in self.prepared_names}


class OnnxEncoderDecoder:
    """What ``Captioner`` uses of an ``EncoderDecoder`` (``encode``, ``decoder``, ``to``, ``eval``), on onnxruntime."""

    def __init__(self, encoder: OnnxGraph, decoder: OnnxDecoder) -> None:
        self.encoder, self.decoder = encoder, decoder

    def encode(self, images: torch.Tensor) -> PreparedImages:
        """(batch, 3, size, size) pixels in [0, 1] -> the prepared images."""
        outputs = self.encoder(images=images.float())
        return PreparedImages(**{name: outputs[name] for name in self.decoder.prepared_names})

    def to(self, device: torch.device) -> "OnnxEncoderDecoder":
        """The tensors stay on the CPU, where onnxruntime's CPU provider reads and writes them."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"an exported model runs on onnxruntime's CPU provider, not on {device}")
        return self

    def eval(self) -> "OnnxEncoderDecoder":
        return self  # the graphs were exported in eval mode (no dropout)


def read_export(directory: str | Path) -> tuple[dict[str, Any], Vocabulary]:
    """An export folder's settings and vocabulary, checked to be this format with the fields captioning reads;
    errors name the folder, the file and the field."""
    directory = Path(directory)
    settings_file = directory / SETTINGS_FILE
    if not settings_file.is_file():
        raise ValueError(f"--onnx {directory} is not an export folder (no {SETTINGS_FILE}); write one with "
                         "`captioning export --checkpoint X --output DIR`")
    try:
        settings = json.loads(settings_file.read_text())
        tokens = json.loads((directory / VOCAB_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--onnx {directory}: cannot read its settings or vocabulary: {error}") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ValueError(f"--onnx {directory}: {SETTINGS_FILE} is not a {FORMAT} settings file")
    if settings.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"--onnx {directory} is format version {settings.get('format_version')}, this version reads "
                         f"{FORMAT_VERSION}: export the checkpoint again")
    label = f"--onnx {directory}"
    check_fields(settings, SETTINGS_FIELDS, label, f"{SETTINGS_FILE}: ")
    check_image_size(settings.get("image_size"), label, f"{SETTINGS_FILE}: image_size")
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise ValueError(f"{label}: {VOCAB_FILE} must be a JSON list of words")
    return settings, saved_vocabulary(tokens, settings.get(VOCAB_FINGERPRINT), label, VOCAB_FILE)


def _check_graphs(graphs: Mapping[str, OnnxGraph], settings: Mapping[str, Any], label: str) -> None:
    """The graphs must be the ones ``settings.json`` describes: an edited image_size or name list would
    otherwise fail inside onnxruntime, naming neither the file nor the field."""
    images = graphs["encoder"].session.get_inputs()[0].shape  # (batch, 3, size, size); a dynamic axis is a name
    size = settings["image_size"]
    if any(isinstance(dim, int) and dim != size for dim in images[2:]):
        raise CheckpointError(f"{label}: {SETTINGS_FILE}: image_size is {size}, but {GRAPH_FILES['encoder']} takes "
                              f"{images[2]}x{images[3]} images; {EDITED}")
    states = settings["graphs"]["init_state"]["outputs"]
    attention = ["attention"] if settings["attention"] else []
    described = {"encoder": settings["prepared"], "init_state": states,
                 "step": ["logits", *(f"new_{name}" for name in states), *attention]}
    for name, outputs in described.items():
        if graphs[name].outputs != outputs:
            raise CheckpointError(f"{label}: {SETTINGS_FILE} (prepared, graphs, attention) names the outputs "
                                  f"{outputs} for {GRAPH_FILES[name]}, which has {graphs[name].outputs}; {EDITED}")


def onnx_captioner(directory: str | Path, beam_size: int | None = None, max_length: int | None = None,
                   n_best: int | None = None, length_penalty: float | None = None,
                   block_trigrams: bool | None = None, threads: int | None = None, device: str = "cpu"
                   ) -> Captioner:
    """A ``Captioner`` over an export folder; decoding settings not given (None) are the training run's,
    as for ``Captioner.from_checkpoint``. ``device``: cpu (or auto, which means cpu here)."""
    if device not in ("auto", "cpu"):
        raise ValueError(f"--device {device}: an exported model runs on onnxruntime's CPU provider; use --device cpu "
                         "with --onnx, or caption with --checkpoint on the GPU")
    directory = Path(directory)
    settings, vocab = read_export(directory)
    graphs = {name: OnnxGraph(directory / file, threads) for name, file in GRAPH_FILES.items()}
    _check_graphs(graphs, settings, f"--onnx {directory}")
    hparams = {key: settings["generation"].get(key) for key in HPARAM_FIELDS}
    generation = generation_settings(hparams, f"--onnx {directory}: {SETTINGS_FILE}: generation", beam_size=beam_size,
                                      max_length=max_length, n_best=n_best, length_penalty=length_penalty,
                                      block_trigrams=block_trigrams)
    decoder = OnnxDecoder(graphs["init_state"], graphs["step"], settings)
    return Captioner(OnnxEncoderDecoder(graphs["encoder"], decoder), vocab, settings["image_size"], generation)
