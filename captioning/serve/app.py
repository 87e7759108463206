"""The demo server's web app: the page, ``POST /caption``, and the guards that keep it serving.

Every upload is treated as hostile: a request body over the size limit is refused with 413 as soon
as its header (or its bytes) say so, before it is parsed or stored; an image of more pixels than
the server's limit is refused with 413 from its header, before it is decoded (a 78 KB PNG can
declare 9000x9000 pixels: 240 MB decoded); bytes that are not an image get 400; every error is JSON
``{"error": ...}``. Requests are queued and captioned in batches by one worker, so concurrent uploads
share model calls instead of racing for the model, and a full queue answers 503 rather than piling
up memory. Should a batch fail, each of its uploads is captioned alone, so only the one that fails
answers 500.
"""

import asyncio
import io
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.resources import files
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from captioning.caption import Captioner, CaptionResult
from captioning.data.images import BadImageError

log = logging.getLogger(__name__)

PAGE = files("captioning.serve") / "static" / "index.html"
CAPTION_PATH = "/caption"
MAX_BATCH = 8  # uploads captioned in one model call
MAX_QUEUED = 64  # uploads waiting; more are refused with 503 (each holds its bytes in memory)
DEFAULT_MAX_PIXELS = 40_000_000  # 40 Mpx: a large camera's photo; 120 MB once decoded to RGB

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class UploadLimit:
    """ASGI middleware: a ``POST /caption`` body over ``max_bytes`` gets 413 before anything parses or stores it.

    The ``Content-Length`` header is checked first; a body sent without one (chunked) is counted as it
    arrives and cut off at the limit (FastAPI passes an ``HTTPException`` raised by a middleware's
    ``receive`` through its body parsing), so a client cannot make the server spool an unlimited upload.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        megabytes = max_bytes / 2**20
        self.message = (f"the upload is larger than the server's limit of {megabytes:g} MB (captioning serve "
                        "--max-upload-mb); send a smaller image")

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] != CAPTION_PATH:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, self.message)
            response.headers["Connection"] = "close"  # the body is not read
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message, headers={"Connection": "close"})
            return message

        await self.app(scope, counting_receive, send)


class CaptionQueue:
    """Uploads waiting to be captioned; one worker takes up to ``MAX_BATCH`` at a time into one model call.

    The model runs in a worker thread, so the server keeps accepting (and refusing) requests meanwhile.
    """

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self.queue: asyncio.Queue[tuple[bytes, asyncio.Future]] = asyncio.Queue(MAX_QUEUED)
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)

    async def caption(self, data: bytes) -> CaptionResult | BadImageError:
        """The upload's caption, or the error that kept its bytes from being read as an image."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((data, future))  # asyncio.QueueFull when MAX_QUEUED are waiting
        return await future

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            outcomes = await self._caption_batch([data for data, _ in batch])
            for (_, future), outcome in zip(batch, outcomes):
                if future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception) and not isinstance(outcome, BadImageError):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _caption_batch(self, uploads: list[bytes]) -> list[CaptionResult | Exception]:
        """Each upload's outcome; a failure of the batch is retried upload by upload, so one upload that breaks
        the model answers 500 alone and the others still get their captions. The worker goes on either way."""
        try:
            return await asyncio.to_thread(
                lambda: list(self.captioner.caption_files(uploads, batch_size=len(uploads))))
        except Exception as error:
            if len(uploads) == 1:
                log.exception("captioning an upload failed")
                return [error]
            log.warning("captioning a batch of %d uploads failed (%r): captioning each alone", len(uploads), error)
            return [(await self._caption_batch([upload]))[0] for upload in uploads]


def header_pixels(data: bytes) -> int | None:
    """Width x height as the image file's header declares them, nothing decoded; None when PIL cannot read
    the header (the captioner then decodes nothing either and says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the server's limit is checked here
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except Exception:  # noqa: BLE001 - any header PIL cannot read fails again, named, in the captioner
        return None


def result_json(result: CaptionResult) -> dict[str, Any]:
    """The API's answer: the best caption, the n-best list and, for attention models, each word's grid."""
    attention = None
    if result.attention is not None:
        attention = np.round(result.attention.astype(np.float64), 5).tolist()  # (words, grid, grid)
    return {"caption": result.caption, "log_prob": result.log_prob,
            "n_best": [{"caption": caption, "log_prob": log_prob} for caption, log_prob in result.n_best],
            "words": result.words, "attention": attention}


def create_app(captioner: Captioner, max_upload_bytes: int = 20 * 2**20,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    """The app serving ``captioner``: ``GET /`` the page, ``POST /caption`` (multipart field ``file``) its JSON.

    Uploads over ``max_upload_bytes`` or images of more than ``max_pixels`` are refused with 413.
    """
    queue = CaptionQueue(captioner)
    app = FastAPI(title="captioning", lifespan=_lifespan(queue), docs_url=None, redoc_url=None)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        response = error_response(error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(Exception)
    async def failure(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed: %r", request.method, request.url.path, error)
        return error_response(500, f"the server could not caption this image ({type(error).__name__}); "
                                   "its log has the details")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, "send the image as the multipart/form-data field 'file' "
                                   f"(e.g. curl -F file=@photo.jpg): {error.errors()[0].get('msg', 'invalid request')}")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.post(CAPTION_PATH)
    async def caption(file: UploadFile = File(...)) -> JSONResponse:
        data = await file.read()
        name = file.filename or "the upload"
        if not data:
            return error_response(400, f"{name} is empty: choose an image file")
        pixels = await asyncio.to_thread(header_pixels, data)
        if pixels is not None and pixels > max_pixels:
            return error_response(413, f"{name} has {pixels} pixels, more than the server's limit of {max_pixels} "
                                       "(captioning serve --max-pixels): send a smaller image")
        try:
            outcome = await queue.caption(data)
        except asyncio.QueueFull:
            return error_response(503, "the server is busy captioning other uploads; try again in a moment")
        if isinstance(outcome, BadImageError):
            return error_response(400, f"{name} cannot be used as an image: {outcome.detail}")
        return JSONResponse(result_json(outcome))

    return app


def _lifespan(queue: CaptionQueue) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the caption worker with the server and stop it with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        yield
        await queue.stop()

    return lifespan
