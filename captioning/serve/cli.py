"""``captioning serve``'s flags: bind the address, load the checkpoint (safely: ``Captioner.from_checkpoint``),
then run uvicorn on the socket already bound.

The address is bound first, so a busy ``--port`` or a ``--host`` that is not this machine's is said
(exit status 2) before the model loads, instead of uvicorn failing (exit 3) after the log said "serving".
"""

import argparse
import errno
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import uvicorn

from captioning.caption import Captioner
from captioning.cli_args import int_between, port, positive_float, positive_int
from captioning.data.images import MAX_PIXELS
from captioning.errors import InputError
from captioning.serve.app import DEFAULT_MAX_PIXELS, create_app

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="captioning serve",
        description="Serve a demo page (GET /) and a JSON API (POST /caption, multipart field 'file') that caption "
                    "uploaded images with a checkpoint.",
        epilog="exit status: 0 stopped (Ctrl-C); 2 usage or input error (e.g. a bad checkpoint, a busy --port), "
               "nothing served")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                                                            "default: this machine only)")
    parser.add_argument("--port", type=port, default=8000, help="TCP port (default 8000; 0: any free one)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=20.0,
                        help="larger uploads are refused with 413 (default 20)")
    parser.add_argument("--max-pixels", type=int_between(1, MAX_PIXELS), default=DEFAULT_MAX_PIXELS,
                        help=f"images of more pixels (width x height, read from the header before decoding) are "
                             f"refused with 413 (default {DEFAULT_MAX_PIXELS}: 40 Mpx; at most PIL's {MAX_PIXELS})")
    parser.add_argument("--beam-size", type=positive_int, help="1: greedy (default: the training one)")
    parser.add_argument("--n-best", type=positive_int, help="captions shown per image (default: the beam size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` as uvicorn binds one (SO_REUSEADDR), or ``InputError`` naming the flag."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        reason = error.strerror or error
        if error.errno == errno.EADDRINUSE:
            advice = f"another program listens on --port {port}: choose another --port (0: any free one)"
        elif error.errno == errno.EACCES:
            advice = f"--port {port} needs privileges here: choose a --port of 1024 or more"
        else:
            advice = (f"--host {host} is not an address of this machine: give 127.0.0.1 (this machine only) "
                      "or 0.0.0.0 (every interface)")
        raise InputError(f"cannot listen on {host}:{port} ({reason}): {advice}") from None
    return listener


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        listener = bind(args.host, args.port)
    except InputError as error:
        print(f"captioning serve: {error}", file=sys.stderr)
        return 2
    with listener:
        try:  # --n-best over the beam size is refused here, naming both flags
            captioner = Captioner.from_checkpoint(args.checkpoint, args.device, beam_size=args.beam_size,
                                                  n_best=args.n_best)
        except (FileNotFoundError, ValueError, RuntimeError) as error:  # CheckpointError is a ValueError
            print(f"captioning serve: {error}", file=sys.stderr)
            return 2
        if args.n_best is None:  # the page shows every caption of the beam
            captioner.generation = replace(captioner.generation, n_best=captioner.generation.beam_size)
        app = create_app(captioner, max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels)
        bound_port = listener.getsockname()[1]  # --port 0: the one the system chose
        log.info("serving %s on http://%s:%d/", args.checkpoint,
                 f"[{args.host}]" if ":" in args.host else args.host, bound_port)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=bound_port, log_level="info"))
        try:
            server.run(sockets=[listener])
        except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then raises it again
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
