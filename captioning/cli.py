"""The ``captioning`` command: one entry point, one subcommand per tool.

    captioning caption photos/ --checkpoint best.ckpt --output captions.json
    captioning evaluate results.json --annotations captions_val2017.json
    captioning prepare --format coco --annotations captions_train2017.json --images train2017 --image-cache
    captioning serve --checkpoint best.ckpt
    captioning export --checkpoint best.ckpt --output exported/

Each subcommand is a module's ``main(argv) -> int`` with its own parser and ``--help``; it is
imported only when asked for, so ``captioning --help`` answers without loading torch.
"""

import importlib
import sys
import textwrap
from collections.abc import Sequence

from captioning.cli_args import EXIT_STATUS_HELP

# name -> (module whose main(argv) runs it, one line for the overview)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("captioning.caption", "caption image files, folders or globs with a checkpoint"),
    "evaluate": ("captioning.evaluation.cli", "score a COCO results file (BLEU, METEOR, ROUGE_L, CIDEr, SPICE)"),
    "prepare": ("captioning.data.prepare", "check a dataset; write its vocabulary, a report and the image cache"),
    "serve": ("captioning.serve", "a demo web page: drop an image, see its captions and attention"),
    "export": ("captioning.export", "write a checkpoint as ONNX graphs, safetensors weights and JSON settings"),
}


def usage() -> str:
    """The overview ``captioning --help`` prints: built here, so no subcommand module is imported for it."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return ("usage: captioning {" + ",".join(SUBCOMMANDS) + "} [--help] ...\n\n"
            "Image captioning: train with train.py, then use a checkpoint with these commands.\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n"
            "`captioning COMMAND --help` lists a command's flags; the flags they share are named alike\n"
            "(--checkpoint, --output, --batch-size, --device, --beam-size).\n\n"
            + textwrap.fill(EXIT_STATUS_HELP, 100) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named subcommand with the remaining arguments; its exit status is returned."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help"):
        (sys.stdout if arguments else sys.stderr).write(usage())
        return 0 if arguments else 2
    name, rest = arguments[0], arguments[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"captioning: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}\n\n{usage()}")
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            sys.stderr.write(f"captioning: the {name} command is not part of this installation "
                             f"({module_name} is missing)\n")
        else:
            sys.stderr.write(f"captioning: the {name} command needs the Python package {error.name!r}, which is "
                             "not installed; reinstall captioning with its dependencies (pip install -e .)\n")
        return 2
    try:
        return module.main(rest)
    except SystemExit as stop:  # argparse: 0 after --help, 2 for bad flags
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
