"""The one way this project reads a checkpoint: a local file, as data only.

A checkpoint is a pickle, and a pickle can carry code that runs while it is read. So every
checkpoint (``train.py ckpt_path=`` / ``init_from=``, ``caption --checkpoint``, the module's
encoder weights) goes through ``load_checkpoint``: local files only (a URL is refused: download it
and pass the local path), always ``torch.load(..., map_location="cpu", weights_only=True)``, which
rebuilds tensors and plain Python data and refuses anything else. When a file cannot be read, the
error says which file and what is wrong with it in plain words.
"""

import logging
import os
import pickletools
import re
import reprlib
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)
# scheme://... (http, https, s3, gs, file, hf, ...): never fetched and unpickled on the fly
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")
_PICKLE_SCAN_BYTES = 64 << 20  # the pickles of a legacy-format file come first, its tensor bytes after
CAPTIONING_KEYS = ("hyper_parameters", "state_dict")
# what Lightning needs to score (trainer.test) or resume (trainer.fit) from a checkpoint
LIGHTNING_KEYS = ("pytorch-lightning_version",)
RESUME_KEYS = ("pytorch-lightning_version", "optimizer_states", "loops", "epoch", "global_step")
VOCAB_FINGERPRINT = "vocab_sha256"  # Vocabulary.fingerprint of the words the weights were trained with
_WRITTEN_BY_TRAIN = "use a checkpoint written by train.py (its run's checkpoints/best.ckpt or last.ckpt)"
EDITED = "the file was edited or damaged: use an unedited copy (as train.py or `captioning export` wrote it)"
_KINDS = {dict: "a mapping", bool: "true or false", list[str]: "a list of strings"}  # check_fields' kinds


class CheckpointError(ValueError):
    """A checkpoint file that cannot or must not be loaded; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint's path."""


def describe(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """How messages name the file: ``checkpoint X`` or, for a setting (``what`` ending in ``=``), ``ckpt_path=X``."""
    return f"{what}{path}" if what.endswith("=") else f"{what} {path}"


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", *, lightning: bool = False,
                    resume: bool = False) -> dict[str, Any]:
    """The checkpoint at local ``path``, read as data only (``weights_only=True``) onto the CPU.

    ``what`` is how the user gave the file, for the messages: ``"checkpoint"``, ``"--checkpoint"``, or
    a setting such as ``"ckpt_path="``. The file must be a captioning checkpoint (a dict with
    ``hyper_parameters`` and ``state_dict``); ``lightning=True`` also asks for what Lightning needs
    to score it, ``resume=True`` for what it needs to resume training from it. Raises
    ``CheckpointError`` (``CheckpointNotFoundError`` for a missing file) with a message naming the
    file and the problem.
    """
    checkpoint = load_data(path, what)
    _check_contents(checkpoint, describe(os.fspath(path), what), lightning=lightning, resume=resume)
    return checkpoint


def load_data(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Whatever torch-saved data is at local ``path`` (a checkpoint, or a plain state dict of weights), read as
    data only (``weights_only=True``) onto the CPU; ``CheckpointError`` naming the file and the problem otherwise.

    ``load_checkpoint`` is this plus the checks of a captioning checkpoint; plain weight files (the
    benchmarks' ``--weights``) are read with this alone. (``captioning/models`` may not import this
    module, so ``model.encoder.weights_path`` is read by ``backbones.py`` with the same ``weights_only``
    rule and its own plain-words error.)
    """
    text = os.fspath(path)
    label = describe(text, what)
    if _URL.match(text):
        raise CheckpointError(f"{label} is a URL: only local files are loaded (a checkpoint is never fetched "
                              "and read on the fly); download it first and pass the local path")
    file = Path(text)
    if file.is_dir():
        raise CheckpointError(f"{label} is a directory, not a checkpoint file (give a file inside it, e.g. "
                              "checkpoints/best.ckpt of a run)")
    if not file.exists():
        raise CheckpointNotFoundError(f"{label} is not a file ({text} does not exist)")
    if not file.is_file():
        raise CheckpointError(f"{label} is not a regular file (a FIFO, socket or device), so it is not read")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise about a file refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own text would advise weights_only=False: never pass it on
        if isinstance(error, OSError) and not os.access(file, os.R_OK):
            raise CheckpointError(f"{label} cannot be read: {error.strerror or error}") from None
        raise CheckpointError(f"{label} {_why_unreadable(file, error)}") from None
    return checkpoint


def nonfinite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity, in order."""
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all())]


def check_finite(checkpoint: Mapping[str, Any], label: str) -> None:
    """Refuse a checkpoint whose weights are not all finite (a diverged run), naming the first such tensor."""
    state = checkpoint.get("state_dict") or {}
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{label} has non-finite weights ({len(bad)} of {len(state)} tensors hold NaN or "
                              f"infinity, the first {bad[0]}): the run that wrote it diverged (a learning rate "
                              "too high?), so it is not used; take an earlier checkpoint or retrain")


def check_fields(settings: Mapping[str, Any], schema: Mapping[str, Any], label: str, where: str) -> None:
    """Refuse saved settings (a checkpoint's hyper_parameters, an export's settings.json) with a field missing or of
    another kind, naming the file (``label``) and the field (``where`` + its name); an edited file would otherwise
    fail later, in a traceback. ``schema``: field -> a kind of ``_KINDS``, or a nested schema (a mapping)."""
    for key, kind in schema.items():
        field = f"{where}{key}"
        if key not in settings:
            raise CheckpointError(f"{label}: {field} is missing; {EDITED}")
        value = settings[key]
        if isinstance(kind, Mapping):
            if not isinstance(value, dict):
                raise CheckpointError(f"{label}: {field} is {reprlib.repr(value)}, not a mapping; {EDITED}")
            check_fields(value, kind, label, f"{field}.")
        elif not _is_a(value, kind):
            raise CheckpointError(f"{label}: {field} is {reprlib.repr(value)}, not {_KINDS[kind]}; {EDITED}")


def _is_a(value: Any, kind: Any) -> bool:
    if kind == list[str]:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, kind)


def saved_vocabulary(tokens: list[str], recorded: str | None, label: str, where: str) -> Vocabulary:
    """The vocabulary saved beside a model's weights (``where`` in ``label``), refused when it is none (special
    tokens missing, a word repeated) or not the one the weights were trained with (``check_vocabulary``)."""
    try:
        vocab = Vocabulary(tokens)
    except ValueError as error:
        raise CheckpointError(f"{label}: {where} is refused: {error}; {EDITED}") from None
    check_vocabulary(recorded, vocab.fingerprint, label, where)
    return vocab


def check_vocabulary(recorded: str | None, fingerprint: str, label: str, where: str) -> None:
    """Refuse a vocabulary that is not the one the weights were trained with (``recorded``, its fingerprint).

    Reordered or replaced words still load and caption, but every id then names another word. A
    file written before fingerprints were recorded (``recorded`` None) cannot be checked, and says so.
    """
    if recorded is None:
        log.warning("%s records no vocabulary fingerprint (written by an older version): its vocabulary cannot be "
                    "checked against its weights", label)
    elif recorded != fingerprint:
        raise CheckpointError(f"{label}: its vocabulary ({where}) is not the one its weights were trained with (the "
                              "fingerprint differs: words reordered, added or replaced), so every caption would "
                              "name the wrong words; use the run's own unedited file")


def _check_contents(checkpoint: Any, label: str, *, lightning: bool, resume: bool) -> None:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{label} holds a {type(checkpoint).__name__}, not a captioning checkpoint (a dict "
                              f"with {' and '.join(CAPTIONING_KEYS)}); {_WRITTEN_BY_TRAIN}")
    missing = [key for key in CAPTIONING_KEYS if key not in checkpoint]
    if missing:
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            raise CheckpointError(
                f"{label} is a plain state_dict, not a captioning checkpoint; it holds {len(checkpoint)} tensors "
                f"(e.g. {next(iter(checkpoint))!r}) but no hyper_parameters (the vocabulary and the model's "
                f"settings) to rebuild the model with; {_WRITTEN_BY_TRAIN}")
        raise CheckpointError(f"{label} is not a captioning checkpoint: it has no {' or '.join(missing)} (its keys: "
                              f"{_keys(checkpoint)}); {_WRITTEN_BY_TRAIN}")
    state, settings = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{label} is damaged: its state_dict is not a mapping of names to tensors")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{label} is damaged: its hyper_parameters are a {type(settings).__name__}, not a "
                              "mapping of settings")
    needed = RESUME_KEYS if resume else LIGHTNING_KEYS if lightning else ()
    absent = [key for key in needed if key not in checkpoint]
    if absent:
        doing = "resume training from it" if resume else "evaluate it"
        raise CheckpointError(f"{label} holds the model but not what Lightning needs to {doing} (no "
                              f"{', '.join(absent)}); to start a new run from its weights use init_from=; "
                              f"else {_WRITTEN_BY_TRAIN}")


def _keys(mapping: Mapping[str, Any], shown: int = 8) -> str:
    keys = [repr(key) for key in list(mapping)[:shown]]
    return ", ".join(keys) + (" ..." if len(mapping) > shown else "") if keys else "none"


def _why_unreadable(file: Path, error: Exception) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in plain words (no torch advice)."""
    size = file.stat().st_size
    if size == 0:
        return "is empty (0 bytes): not a checkpoint (an interrupted download or copy?)"
    with open(file, "rb") as handle:
        head = handle.read(4)
    message = str(error)
    code = ("it contains objects other than tensors and plain data, so it is not loaded: a checkpoint is data, "
            "never code")
    if head == b"PK\x03\x04":  # torch.save's zip format
        pickled = _zip_pickle(file)
        if pickled is None:
            return (f"is truncated or damaged ({size} bytes; its zip archive cannot be read as a torch checkpoint, "
                    "an interrupted download or copy?)")
        globals_ = _pickle_globals(pickled)
        if globals_ is None:
            return f"is damaged ({size} bytes): the data inside its zip archive is not a readable pickle"
        return _code_or_damage(code, globals_, message)
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle stream (the legacy torch format, or pickle.dump)
        with open(file, "rb") as handle:
            globals_ = _pickle_globals(handle.read(_PICKLE_SCAN_BYTES))
        if globals_ is None:
            return f"is a truncated or damaged pickle ({size} bytes; an interrupted download or copy?)"
        return _code_or_damage(code, globals_, message)
    kind = "text" if _looks_like_text(file) else "random bytes or another format"
    return (f"is not a torch checkpoint file ({size} bytes of {kind}: neither a torch zip archive nor a pickle; "
            "a truncated download, or the wrong file?)")


def _code_or_damage(code: str, globals_: list[str], message: str) -> str:
    named = _GLOBAL_NAME.search(message)
    refused = next((name for name in globals_ if not _plain(name)), None)
    if refused is None and named is not None and not _plain(named.group(1)):
        refused = named.group(1)
    if refused is not None:
        return f"is refused: {code} (it asks for {refused})"
    return "is damaged or not written by torch.save: its pickle cannot be read as plain data"


def _plain(name: str) -> bool:
    """Globals a ``torch.save`` checkpoint of tensors and plain data refers to (storages, rebuild helpers)."""
    return name.startswith("torch.") or name in ("collections.OrderedDict", "_codecs.encode")


def _zip_pickle(file: Path) -> bytes | None:
    """The ``data.pkl`` of a torch zip checkpoint, or None when the archive cannot be read."""
    try:
        with zipfile.ZipFile(file) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return archive.read(name) if name is not None else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        return None


def _pickle_globals(data: bytes, most: int = 8) -> list[str] | None:
    """The ``module.name`` globals the pickles of ``data`` refer to, found without running them.

    The legacy torch format is several pickles in a row (then raw tensor bytes): up to ``most`` are
    read. None when the first one is not a complete pickle (cut short, or not a pickle at all).
    """
    found: list[str] = []
    position = 0
    for _ in range(most):
        strings: list[str] = []
        try:
            for opcode, argument, offset in pickletools.genops(data[position:]):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
                if opcode.name == "STOP":
                    position += offset + 1
                    break
            else:
                return None  # no STOP: cut short
        except Exception:  # noqa: BLE001 - any parse failure: not a (complete) pickle
            return None
        if position >= len(data) or data[position:position + 1] != b"\x80":
            return found  # what follows is not another pickle (tensor bytes of the legacy format)
    return found


def _looks_like_text(file: Path) -> bool:
    with open(file, "rb") as handle:
        sample = handle.read(512)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch.isspace() for ch in sample.decode("utf-8"))


# CaptioningLitModule keeps its EncoderDecoder as ``self.net``: the network's tensors in a checkpoint start with this
NET_PREFIX = "net."


def network_state(checkpoint: Mapping[str, Any], part: str = "") -> dict[str, torch.Tensor]:
    """The ``EncoderDecoder``'s tensors in a training checkpoint (``part="encoder"``: the encoder's only),
    named as that module names them."""
    prefix = NET_PREFIX + (f"{part}." if part else "")
    return {name[len(prefix):]: value for name, value in checkpoint["state_dict"].items() if name.startswith(prefix)}
