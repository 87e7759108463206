"""``captioning serve``'s flags: load the checkpoint (safely: ``Captioner.from_checkpoint``), then run uvicorn."""

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import uvicorn

from captioning.caption import Captioner
from captioning.cli_args import positive_int
from captioning.serve.app import create_app

log = logging.getLogger(__name__)


def megabytes(text: str) -> float:
    """An argparse type: a finite size in MB > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of megabytes > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of megabytes > 0, got {text!r}")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="captioning serve",
        description="Serve a demo page (GET /) and a JSON API (POST /caption, multipart field 'file') that caption "
                    "uploaded images with a checkpoint.",
        epilog="exit status: 0 stopped (Ctrl-C); 2 usage or input error (e.g. a bad checkpoint), nothing served")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                                                            "default: this machine only)")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--max-upload-mb", type=megabytes, default=20.0,
                        help="larger uploads are refused with 413 (default 20)")
    parser.add_argument("--beam-size", type=positive_int, help="1: greedy (default: the training one)")
    parser.add_argument("--n-best", type=positive_int, help="captions shown per image (default: the beam size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        captioner = Captioner.from_checkpoint(args.checkpoint, args.device, beam_size=args.beam_size)
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # CheckpointError is a ValueError
        print(f"captioning serve: {error}", file=sys.stderr)
        return 2
    beam_size = captioner.generation.beam_size
    if args.n_best is not None and args.n_best > beam_size:
        print(f"captioning serve: --n-best must be at most the beam size ({beam_size}), got {args.n_best}: ask for "
              f"--beam-size {args.n_best} or more", file=sys.stderr)
        return 2
    captioner.generation = replace(captioner.generation, n_best=args.n_best or beam_size)  # the page shows them all
    app = create_app(captioner, max_upload_bytes=int(args.max_upload_mb * 2**20))
    log.info("serving %s on http://%s:%d/", args.checkpoint, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
