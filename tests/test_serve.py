"""``captioning serve``: the real server in a subprocess, its JSON API under hostile uploads, and the page in a
real headless Chromium (Debian's ``chromium`` and ``chromedriver``; ``.ci/run`` installs them)."""

import asyncio
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from captioning.caption import Captioner, CaptionResult
from captioning.data.images import MAX_PIXELS
from captioning.serve.app import DEFAULT_MAX_PIXELS, CaptionQueue
from captioning.serve.cli import main as serve_main
from tests.conftest import PROJECT_ROOT
from tests.test_caption import attention_checkpoint  # noqa: F401 (a fixture: a tiny trained attention model)

BEAM_SIZE = 3
MAX_UPLOAD_MB = 1
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(attention_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``captioning serve`` on a free port, as a user starts it; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "captioning.cli", "serve", "--checkpoint", str(attention_checkpoint),
             "--port", str(port), "--beam-size", str(BEAM_SIZE), "--max-upload-mb", str(MAX_UPLOAD_MB),
             "--device", "cpu"], stdout=output, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not answer within 120 s:\n{log.read_text()}"
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def photo(shared_data: Path) -> Path:
    return sorted((shared_data / "coco-val2017-mini" / "val2017").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def expected(attention_checkpoint: Path, photo: Path) -> dict:
    """What the Python API gives for ``photo`` with the server's settings."""
    captioner = Captioner.from_checkpoint(attention_checkpoint, device="cpu", beam_size=BEAM_SIZE, n_best=BEAM_SIZE)
    result = captioner.caption([photo])[0]
    return {"caption": result.caption, "log_prob": result.log_prob, "n_best": result.n_best,
            "words": result.words, "attention": result.attention}


def _post(url: str, data: bytes, name: str = "photo.jpg", field: str = "file") -> httpx.Response:
    return httpx.post(url + "/caption", files={field: (name, data, "application/octet-stream")}, timeout=120)


@pytest.mark.slow
def test_caption_api_gives_the_captioners_n_best_and_attention(server: str, photo: Path, expected: dict) -> None:
    response = _post(server, photo.read_bytes(), photo.name)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["caption"] == expected["caption"]
    assert answer["log_prob"] == pytest.approx(expected["log_prob"], abs=1e-3)
    assert [entry["caption"] for entry in answer["n_best"]] == [caption for caption, _ in expected["n_best"]]
    assert [entry["log_prob"] for entry in answer["n_best"]] == pytest.approx(
        [log_prob for _, log_prob in expected["n_best"]], abs=1e-3)
    assert len(answer["n_best"]) == BEAM_SIZE
    assert answer["words"] == expected["words"]
    attention = np.array(answer["attention"])
    assert attention.shape == (len(expected["words"]), 4, 4)  # the model's 4x4 grid, one map per word
    assert attention.sum(axis=(1, 2)) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(attention, expected["attention"], atol=1e-4)


def _truncated_jpeg(photo: Path) -> bytes:
    data = photo.read_bytes()
    return data[:len(data) // 3]


@pytest.mark.slow
@pytest.mark.parametrize("upload", ["random bytes", "text", "truncated jpeg", "empty", "wrong field"])
def test_bad_upload_gets_a_json_4xx_and_the_server_keeps_serving(server: str, photo: Path, upload: str) -> None:
    if upload == "wrong field":
        response = _post(server, photo.read_bytes(), field="image")
    else:
        data = {"random bytes": np.random.default_rng(0).bytes(5000), "text": b"GIF89a but not really, just text",
                "truncated jpeg": _truncated_jpeg(photo), "empty": b""}[upload]
        response = _post(server, data, name="upload.jpg")
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert ("'file'" if upload == "wrong field" else "upload.jpg") in message
    assert _post(server, photo.read_bytes()).status_code == 200  # still serving


@pytest.mark.slow
def test_upload_over_the_limit_gets_413_declared_or_streamed(server: str, photo: Path) -> None:
    big = np.random.default_rng(1).bytes(MAX_UPLOAD_MB * 2**20 + 1000)
    declared = _post(server, big)  # multipart with a Content-Length: refused from the header
    assert declared.status_code == 413 and "--max-upload-mb" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts the bytes as they come
        yield b"--boundary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n\r\n"
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]
        yield b"\r\n--boundary--\r\n"

    streamed = httpx.post(server + "/caption", content=chunks(), timeout=120,
                          headers={"Content-Type": "multipart/form-data; boundary=boundary"})
    assert streamed.status_code == 413 and "--max-upload-mb" in streamed.json()["error"]
    assert _post(server, photo.read_bytes()).status_code == 200


@pytest.mark.slow
def test_concurrent_uploads_are_all_answered(server: str, photo: Path, expected: dict) -> None:
    good, bad = photo.read_bytes(), b"not an image"
    uploads = [good, bad, good, good, bad, good, good, good, good, good, bad, good]
    with ThreadPoolExecutor(max_workers=len(uploads)) as pool:
        responses = list(pool.map(lambda data: _post(server, data), uploads))
    for data, response in zip(uploads, responses):
        if data is good:
            assert response.status_code == 200 and response.json()["caption"] == expected["caption"]
        else:
            assert response.status_code == 400 and "error" in response.json()


def test_serve_refuses_a_bad_checkpoint_and_flags_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                ) -> None:
    missing = tmp_path / "missing.ckpt"
    assert serve_main(["--checkpoint", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert serve_main(["--checkpoint", str(junk)]) == 2
    assert "junk.ckpt" in capsys.readouterr().err
    for flags, named in ((["--port", "70000"], "--port"), (["--max-upload-mb", "0"], "--max-upload-mb"),
                         (["--beam-size", "0"], "--beam-size"), (["--max-pixels", "0"], "--max-pixels"),
                         (["--max-pixels", str(MAX_PIXELS + 1)], "--max-pixels")):
        with pytest.raises(SystemExit) as stop:
            serve_main(["--checkpoint", str(junk), *flags])
        assert stop.value.code == 2 and named in capsys.readouterr().err


def test_serve_refuses_a_busy_port_or_a_foreign_host_before_loading_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.ckpt"  # never looked at: the address is bound first
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        assert serve_main(["--checkpoint", str(missing), "--port", str(busy)]) == 2
    error = capsys.readouterr().err
    assert f"another program listens on --port {busy}" in error and str(missing) not in error
    assert serve_main(["--checkpoint", str(missing), "--host", "203.0.113.1", "--port", "0"]) == 2  # TEST-NET-3
    error = capsys.readouterr().err
    assert "--host 203.0.113.1 is not an address of this machine" in error and str(missing) not in error
    assert "Traceback" not in error


@pytest.mark.slow
def test_serve_refuses_more_captions_than_the_beam_naming_the_flags(attention_checkpoint: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert serve_main(["--checkpoint", str(attention_checkpoint), "--port", "0", "--device", "cpu",
                       "--beam-size", "2", "--n-best", "3"]) == 2
    error = capsys.readouterr().err
    assert "--n-best must be between 1 and the beam size (2), got 3" in error and "--beam-size 3" in error


@pytest.mark.slow
def test_an_image_of_too_many_pixels_gets_413_from_its_header(server: str, photo: Path) -> None:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # under PIL's own limit, over the server's
    assert len(buffer.getvalue()) < 100_000 and 9000 * 9000 > DEFAULT_MAX_PIXELS
    response = _post(server, buffer.getvalue(), name="bomb.png")
    assert response.status_code == 413, response.text
    message = response.json()["error"]
    assert "bomb.png has 81000000 pixels" in message and f"limit of {DEFAULT_MAX_PIXELS}" in message
    assert "--max-pixels" in message
    header_only = _png_header(20000, 20000)  # over twice PIL's limit: PIL refuses even to open it, named as a bomb
    response = _post(server, header_only, name="huge.png")
    assert response.status_code == 400 and "huge.png cannot be used as an image" in response.json()["error"]
    assert _post(server, photo.read_bytes()).status_code == 200


def _png_header(width: int, height: int) -> bytes:
    """A PNG of 8-bit gray pixels that declares ``width`` x ``height`` and holds no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


class _FailingCaptioner:
    """``caption_files`` as the real one, except that any batch holding a ``b"poison"`` upload raises."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def caption_files(self, uploads: list[bytes], batch_size: int) -> list[CaptionResult]:
        self.batches.append(len(uploads))
        if b"poison" in uploads:
            raise RuntimeError("the model failed on this upload")
        return [CaptionResult(upload.decode(), upload.decode(), 0.0, []) for upload in uploads]


def test_one_upload_that_breaks_a_batch_fails_alone() -> None:
    captioner = _FailingCaptioner()
    uploads = [b"a", b"poison", b"b", b"c"]

    async def submit_together() -> list[CaptionResult | BaseException]:
        queue = CaptionQueue(captioner)  # type: ignore[arg-type]
        pending = [asyncio.ensure_future(queue.caption(upload)) for upload in uploads]
        await asyncio.sleep(0)  # all four queued before the worker takes its first batch
        queue.start()
        try:
            return await asyncio.gather(*pending, return_exceptions=True)
        finally:
            await queue.stop()

    outcomes = asyncio.run(submit_together())
    assert captioner.batches == [4, 1, 1, 1, 1]  # the batch, then each upload alone
    assert [outcome.caption for outcome in outcomes if isinstance(outcome, CaptionResult)] == ["a", "b", "c"]
    assert isinstance(outcomes[1], RuntimeError) and "failed on this upload" in str(outcomes[1])


def _chromium() -> tuple[str, Path]:
    """Debian's chromium and its driver; skip with the reason when absent (CI, which installs them, fails)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or not CHROMEDRIVER.is_file():
        message = ("Chromium or its driver is missing (apt-get install chromium chromium-driver; .ci/run does this): "
                   f"chromium={browser}, {CHROMEDRIVER} exists={CHROMEDRIVER.is_file()}")
        if os.environ.get("CAPTIONING_REQUIRE_SHARED") == "1":
            pytest.fail(message + " — CAPTIONING_REQUIRE_SHARED=1 makes this a failure")
        pytest.skip(message)
    return browser, CHROMEDRIVER


@pytest.mark.slow
def test_page_in_headless_chromium_shows_the_caption_and_attention(server: str, photo: Path, expected: dict,
                                                                   tmp_path: Path) -> None:
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        driver.get(server + "/")
        assert driver.title == "Image captioning"
        driver.find_element(By.ID, "file").send_keys(str(photo))  # what picking the file in the dialog does
        caption = WebDriverWait(driver, 120).until(lambda page: page.find_element(By.ID, "best-caption").text
                                                   or page.find_element(By.ID, "error").text and None)
        assert caption == expected["caption"]
        assert driver.find_element(By.ID, "error").text == ""
        items = driver.find_elements(By.CSS_SELECTOR, "#captions li")
        assert [item.text.rsplit(" (log-prob", 1)[0] for item in items] == [c for c, _ in expected["n_best"]]
        assert f"{expected['n_best'][0][1]:.3f}" in items[0].text
        words = driver.find_elements(By.CSS_SELECTOR, "#words button")
        assert [word.text for word in words] == expected["words"]
        words[1].click()
        assert "current" in words[1].get_attribute("class")
        # the canvas shows the photo with the heat map over it: its pixels are not all one colour
        spread = driver.execute_script(
            "const c = document.getElementById('canvas'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let lo = 255, hi = 0;"
            "for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }"
            "return [c.width, hi - lo];")
        assert spread[0] > 100 and spread[1] > 50
        screenshot = tmp_path / "page.png"
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as image:
        assert image.width >= 800 and image.height >= 600
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # a page with a photo on it, not a blank
