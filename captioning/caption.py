"""Caption your own images from a checkpoint alone (CLI ``captioning caption``, alias ``caption``, and Python API).

    captioning caption photos/ more/*.jpg --checkpoint best.ckpt --beam-size 3 --format json --output captions.json
    captioning caption photo.jpg --checkpoint best.ckpt --beam-size 5 --n-best 3   # the 3 best captions each

    from captioning.caption import Captioner
    results = Captioner.from_checkpoint("best.ckpt").caption(["a.jpg", "b.jpg"])

The checkpoint carries the vocabulary, the model settings (decoding ones included: beam size,
length penalty, trigram blocking, whether ``<unk>`` may be generated) and the input size, and is
read with ``torch.load(weights_only=True)``. Without flags, images are captioned exactly as the
run's validation decoded (the same ``GenerationSettings``, built by the same function); flags
override single settings. Unreadable images are reported on stderr and skipped; the others are
still captioned, and the exit status says that something failed.
"""

import argparse
import csv
import glob
import io
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from captioning.checkpoints import (EDITED, VOCAB_FINGERPRINT, CheckpointError, check_fields, check_finite, describe,
                                    load_checkpoint, network_state, saved_vocabulary)
from captioning.cli_args import EXIT_STATUS_HELP, non_negative_float, positive_int
from captioning.config import LOWEST
from captioning.data.datasets import IMAGE_EXTENSIONS
from captioning.data.files import check_writable, replacing, write_text, writing_alone
from captioning.data.images import BadImageError, ImageInput, load_image, open_rgb
from captioning.data.tokenize import detokenize
from captioning.data.transforms import build_image_transform
from captioning.data.vocab import Vocabulary
from captioning.decoding import DecodedCaptions, GenerationSettings, generate
from captioning.models.encoder_decoder import EncoderDecoder, build_encoder_decoder, target_of
from captioning.models.encoders import PrecomputedEncoder

log = logging.getLogger(__name__)
# what rebuilding the model reads of a checkpoint's hyper_parameters (image_size and decoding: checked on their own)
MODEL_FIELDS = {"vocab": list[str], "encoder": dict, "decoder": dict}

@dataclass
class CaptionResult:
    """One image's caption; ``attention`` (words, grid, grid) for attention models, per generated word.

    ``n_best`` holds the captioner's best (caption, log-probability) pairs, best (``caption``) first.
    ``image_id``: the dataset's id of the image, where it has one (``trainer.predict`` over this project's
    data loaders).
    """

    file: str
    caption: str
    log_prob: float
    words: list[str]
    attention: np.ndarray | None = None
    n_best: list[tuple[str, float]] = field(default_factory=list)
    image_id: int | None = None

    @classmethod
    def from_decoded(cls, decoded: DecodedCaptions, vocab: Vocabulary, names: Sequence[str], per_image: int,
                     image_ids: Sequence[int] | None = None) -> list["CaptionResult"]:
        """One result per image of ``generate``'s output (``per_image`` rows each, image-major, best first)."""
        results = []
        for image, name in enumerate(names):
            rows = range(image * per_image, (image + 1) * per_image)
            n_best = [(detokenize(vocab.decode(decoded.tokens[row].tolist())), float(decoded.log_probs[row]))
                      for row in rows]
            words = vocab.decode(decoded.tokens[rows[0]].tolist())
            attention = None
            if decoded.attention is not None:
                weights = decoded.attention[rows[0], :len(words)].float().cpu().numpy()  # (words, num_pixels)
                grid = math.isqrt(weights.shape[1])
                attention = weights.reshape(len(words), grid, grid)
            results.append(cls(name, n_best[0][0], n_best[0][1], words, attention, n_best,
                               None if image_ids is None else image_ids[image]))
        return results

    def as_dict(self, with_n_best: bool = False) -> dict:
        result: dict = {"file": self.file, "caption": self.caption, "log_prob": self.log_prob}
        if with_n_best:
            result["n_best"] = [{"caption": caption, "log_prob": log_prob} for caption, log_prob in self.n_best]
        return result


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    return torch.device(device)


class Captioner:
    """A trained model with its vocabulary, input size and decoding settings, ready to caption images.

    ``caption`` takes files and images in memory, mixed: a path (``str`` or ``Path``), an image
    file's bytes (an upload), a PIL image, a numpy array ((H, W, 3) RGB or (H, W) grayscale, uint8)
    or a torch tensor ((3, H, W) or (1, H, W): uint8 in 0..255, or floating point in [0, 1] as
    ``ToTensor`` gives, rounded to 8 bits like a file's pixels). Every image is turned upright by
    its EXIF orientation (files, bytes and PIL images that still carry it), made RGB and resized
    exactly as in training, so a file and the same pixels in memory get the same caption.
    """

    def __init__(self, model: EncoderDecoder, vocab: Vocabulary, image_size: int,
                 generation: GenerationSettings | None = None, device: str | torch.device = "cpu",
                 hyper_parameters: Mapping[str, Any] | None = None) -> None:
        self.device = torch.device(device)
        # the checkpoint's settings the model was built from (None when built otherwise): export reads them here
        self.hyper_parameters = hyper_parameters
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.image_size = image_size
        self.transform = build_image_transform(image_size)
        self.generation = generation or GenerationSettings()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", beam_size: int | None = None,
                        max_length: int | None = None, n_best: int | None = None, length_penalty: float | None = None,
                        block_trigrams: bool | None = None) -> "Captioner":
        """Rebuild the model from a training checkpoint (no other file, no download).

        Decoding settings not given here (None) are the training run's: without any, captions are
        the ones its validation would generate for the same images.
        """
        checkpoint = load_checkpoint(path)  # a local file only, read as data (weights_only); errors name the file
        label = describe(path)
        check_finite(checkpoint, label)  # a diverged run's weights would caption "figures figures ..."
        settings = checkpoint["hyper_parameters"]  # a dict, as load_checkpoint checked
        check_fields(settings, MODEL_FIELDS, label, "hyper_parameters.")
        if settings["encoder"].get("_target_") == target_of(PrecomputedEncoder):  # trained on features: no image_size
            raise ValueError(f"{label} is a model of precomputed region features (data.precomputed): it has no image "
                             "encoder, so it cannot caption image files; score it with train.py train=false ckpt_path=")
        vocab = saved_vocabulary(settings["vocab"], checkpoint.get(VOCAB_FINGERPRINT), label, "hyper_parameters.vocab")
        image_size = check_image_size(settings.get("image_size"), label, "hyper_parameters.image_size")
        generation = generation_settings(settings, f"{label}: hyper_parameters", beam_size=beam_size,
                                          max_length=max_length, n_best=n_best, length_penalty=length_penalty,
                                          block_trigrams=block_trigrams)
        # the checkpoint holds every weight: build the encoder without loading (or downloading) any
        encoder = {**settings["encoder"], "weights": None, "weights_path": None}
        try:  # an unknown _target_ or argument, or a size that is not the weights' one
            model = build_encoder_decoder(len(vocab), encoder, settings["decoder"])
            model.load_state_dict(network_state(checkpoint))
        except (TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{label}: its model settings (hyper_parameters.encoder, hyper_parameters.decoder) "
                                  f"do not rebuild its weights ({error}); {EDITED}") from None
        return cls(model, vocab, image_size, generation, resolve_device(device), settings)

    def caption(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[CaptionResult]:
        """Captions in input order; ``file`` is each path, or ``<image i>`` (its position) for an image in memory.

        An image that cannot be used raises ``BadImageError`` naming it and why; a value of another
        type raises ``TypeError`` naming its position, before any image is captioned.
        """
        if isinstance(images, ImageInput):
            raise TypeError("Captioner.caption takes a list of images; for one image, pass [image]")
        for index, item in enumerate(images):
            if not isinstance(item, ImageInput):
                raise TypeError(f"image {index} is a {type(item).__module__}.{type(item).__qualname__}; give file "
                                "paths, image files' bytes, PIL images, numpy arrays or torch tensors")
        results = []
        for result in self.caption_files(images, batch_size):
            if isinstance(result, BadImageError):
                raise result
            results.append(result)
        return results

    def caption_files(self, paths: Sequence[ImageInput], batch_size: int = 16, progress: bool = False
                      ) -> Iterator[CaptionResult | BadImageError]:
        """One result per image (``caption``'s inputs), in order: a caption, or the error that kept it from
        being read."""
        batches = range(0, len(paths), batch_size)
        if progress:
            batches = track(batches, description="captioning", total=len(batches), transient=True)
        for start in batches:
            loaded: list[tuple[int, str, torch.Tensor]] = []
            outcomes: list[CaptionResult | BadImageError | None] = []
            for index, item in enumerate(paths[start:start + batch_size], start=start):
                name = str(item) if isinstance(item, (str, Path)) else f"<image {index}>"
                try:
                    loaded.append((len(outcomes), name, self.transform(load_image(item, name))))
                    outcomes.append(None)
                except BadImageError as error:
                    outcomes.append(error)
            if loaded:
                pixels = torch.stack([tensor for _, _, tensor in loaded])  # (images, 3, s, s)
                for (row, _, _), result in zip(loaded, self._caption_tensors(pixels, [n for _, n, _ in loaded])):
                    outcomes[row] = result
            yield from outcomes

    @torch.no_grad()
    def _caption_tensors(self, images: torch.Tensor, names: list[str]) -> list[CaptionResult]:
        """(images, 3, s, s) pixels in [0, 1] -> their captions, decoded as validation decodes."""
        features = self.model.encode(images.to(self.device))
        decoded = generate(self.model.decoder, features, self.vocab, self.generation)
        return CaptionResult.from_decoded(decoded, self.vocab, names, self.generation.n_best)


def check_image_size(value: Any, label: str, field: str) -> int:
    """A saved model's input size (``field`` of the checkpoint or export ``label``), checked: another size would
    feed the model images it was not trained on (0 ran at 224 px)."""
    lowest = int(LOWEST["data.image_size"])
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise CheckpointError(f"{label}: {field} is {value!r}, not a whole number >= {lowest}; {EDITED}")
    return value


def generation_settings(hparams: Mapping[str, Any], where: str, n_best: int | None = None,
                        **overrides: Any) -> GenerationSettings:
    """The saved decoding (``hparams``, read from ``where``) with the given flags.

    The saved settings are checked alone first, so an edited file is named rather than a flag;
    ``--n-best`` is checked here to name the flag to raise.
    """
    try:
        GenerationSettings.from_hparams(hparams)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: its decoding settings are refused ({error}); {EDITED}") from None
    generation = GenerationSettings.from_hparams(hparams, **overrides)
    if n_best is None:
        return generation
    if not 1 <= n_best <= generation.beam_size:
        raise ValueError(f"--n-best must be between 1 and the beam size ({generation.beam_size}), got {n_best}: "
                         f"ask for --beam-size {max(n_best, 2)} or more to get {n_best} captions per image")
    return replace(generation, n_best=n_best)


def save_attention_map(result: CaptionResult, output: Path) -> None:
    """The Show-Attend-Tell figure: the image, then one panel per word with its attention overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.asarray(open_rgb(result.file)[0])
    panels = len(result.words) + 1
    columns = min(panels, 5)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title(result.caption if len(result.caption) < 40 else result.caption[:37] + "...", fontsize=8)
    height, width = image.shape[:2]
    for axis, word, weights in zip(axes.flat[1:], result.words, result.attention):
        heat = Image.fromarray((weights / max(weights.max(), 1e-12) * 255).astype(np.uint8))
        axis.imshow(image)
        axis.imshow(np.asarray(heat.resize((width, height), Image.BILINEAR)), cmap="jet", alpha=0.5)
        axis.set_title(word, fontsize=10)
    figure.tight_layout()
    with replacing(output) as partial:
        figure.savefig(partial, dpi=80, format="png")
    plt.close(figure)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, recursively, sorted) and globs, in order, each file once.

    Only folders are left out: a FIFO, device or broken link named like an image is kept, so that
    reading it reports it as skipped (``images._check_regular_file``) instead of it vanishing silently.
    """
    seen: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        elif any(char in item for char in "*?["):
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if not Path(p).is_dir()]
        else:
            found = [path]
        for file in found:
            seen.setdefault(file, None)
    return list(seen)


def format_results(results: list[CaptionResult], output_format: str, n_best: bool = False) -> str:
    """One entry per image, or with ``n_best`` each image's best captions with their log-probabilities."""
    if output_format == "json":
        return json.dumps([r.as_dict(n_best) for r in results], indent=2) + "\n"
    if output_format == "csv":
        buffer = io.StringIO()
        if n_best:
            writer = csv.DictWriter(buffer, fieldnames=["file", "rank", "caption", "log_prob"])
            writer.writeheader()
            writer.writerows({"file": r.file, "rank": rank, "caption": caption, "log_prob": log_prob}
                             for r in results for rank, (caption, log_prob) in enumerate(r.n_best, start=1))
        else:
            writer = csv.DictWriter(buffer, fieldnames=["file", "caption", "log_prob"])
            writer.writeheader()
            writer.writerows(r.as_dict() for r in results)
        return buffer.getvalue()
    if n_best:
        return "".join(f"{r.file}\t{log_prob:.4f}\t{caption}\n" for r in results for caption, log_prob in r.n_best)
    return "".join(f"{r.file}\t{r.caption}\n" for r in results)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="captioning caption", description="Caption images with a trained checkpoint.",
                                     epilog=EXIT_STATUS_HELP)
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="a training checkpoint (.ckpt)")
    model.add_argument("--onnx", type=Path, metavar="DIR", help="an export folder (captioning export): caption with "
                                                                "onnxruntime on the CPU instead of PyTorch")
    parser.add_argument("--beam-size", type=positive_int, help="1: greedy (default: the training one, as validation decoded)")
    parser.add_argument("--max-length", type=positive_int, help="most words per caption (default: the training one)")
    parser.add_argument("--n-best", type=positive_int, help="the K best captions per image, with log-probabilities "
                                                   "(K <= beam size)")
    parser.add_argument("--length-penalty", type=non_negative_float,
                        help="rank beam captions by log-prob / length ** this, a finite number >= 0: 0 ranks by "
                             "log-prob alone, larger values favour longer captions (a negative one would punish "
                             "length beyond the log-probs, which already do; default: the training one)")
    parser.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction,
                        help="never repeat a word trigram within a caption (default: the training setting)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--format", choices=("text", "json", "csv"), default="text", dest="output_format")
    parser.add_argument("--output", type=Path,
                        help="write here instead of standard output: checked before the model loads, replaced "
                             "whole at the end (never left truncated), and refused while another run writes it")
    parser.add_argument("--attention-maps", type=Path, help="folder for one attention PNG per image")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``caption`` command; exit status 0 all captioned, 1 some images skipped, 2 usage or input error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    files = expand_inputs(args.inputs)
    if not files:
        print("caption: no image found in the given inputs", file=sys.stderr)
        return 2
    with ExitStack() as claimed:
        try:
            _claim_outputs(args, claimed)
            decoding = {"beam_size": args.beam_size, "max_length": args.max_length, "n_best": args.n_best,
                        "length_penalty": args.length_penalty, "block_trigrams": args.block_trigrams}
            if args.onnx is not None:
                from captioning.onnx_runtime import onnx_captioner  # imports this module: loaded only when asked

                captioner = onnx_captioner(args.onnx, device=args.device, **decoding)
            else:
                captioner = Captioner.from_checkpoint(args.checkpoint, args.device, **decoding)
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            print(f"caption: {error}", file=sys.stderr)
            return 2
        results, failed, unmapped = _caption_all(captioner, files, args)
        _write_results(format_results(results, args.output_format, n_best=args.n_best is not None), args.output)
    if failed:
        print(f"caption: {failed} of {len(files)} images could not be read", file=sys.stderr)
    if unmapped:
        print(f"caption: the attention maps of {unmapped} images could not be written (their captions were)",
              file=sys.stderr)
    return 1 if failed or unmapped else 0


def _claim_outputs(args: argparse.Namespace, claimed: ExitStack) -> None:
    """Find unwritable outputs and a concurrent writer of ``--output`` before the model loads (``InputError``)."""
    if args.output is not None:
        check_writable(args.output, "--output")
        claimed.enter_context(writing_alone(args.output, "--output"))
    if args.attention_maps is not None:
        check_writable(args.attention_maps, "--attention-maps", folder=True)


def _caption_all(captioner: Captioner, files: list[Path], args: argparse.Namespace
                 ) -> tuple[list[CaptionResult], int, int]:
    """Every readable file's result, how many files were skipped, and how many attention figures failed.

    A figure that cannot be written (a full disk, the image changed since) is that image's error:
    the run goes on, and every caption is still written.
    """
    results, failed, unmapped = [], 0, 0
    for outcome in captioner.caption_files(files, args.batch_size, progress=len(files) > args.batch_size):
        if isinstance(outcome, BadImageError):
            failed += 1
            print(f"caption: skipped {outcome}", file=sys.stderr)
            continue
        results.append(outcome)
        if args.attention_maps is not None and outcome.attention is not None:
            figure = args.attention_maps / f"{len(results):05d}_{Path(outcome.file).stem}.png"
            try:
                save_attention_map(outcome, figure)
            except (OSError, ValueError) as error:  # BadImageError is a ValueError
                unmapped += 1
                print(f"caption: could not write the attention map of {outcome.file} to {figure}: {error}",
                      file=sys.stderr)
    if args.attention_maps is not None and results and results[0].attention is None:
        print("caption: this model has no attention, so no attention maps were written", file=sys.stderr)
    return results, failed, unmapped


def _write_results(text: str, output: Path | None) -> None:
    """``output`` replaced whole, or standard output; file names that are not UTF-8 keep their own bytes.

    Should ``output`` fail after all (a full disk), the captions go to standard output instead of
    being lost.
    """
    if output is not None:
        try:
            write_text(output, text, errors="surrogateescape")
            return
        except OSError as error:
            print(f"caption: could not write --output {output} ({error.strerror or error}); "
                  "the captions follow on standard output", file=sys.stderr)
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:  # a file name that is not valid in the terminal's encoding
        encoding = sys.stdout.encoding or "utf-8"
        try:
            data = text.encode(encoding, "surrogateescape")  # the name's own bytes, as ls prints them
        except UnicodeEncodeError:
            data = text.encode(encoding, "backslashreplace")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    sys.exit(main())
