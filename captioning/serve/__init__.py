"""``captioning serve``: a demo page and a JSON API that caption uploaded images with a checkpoint.

    captioning serve --checkpoint best.ckpt --port 8000     # then open http://127.0.0.1:8000/

``GET /`` is the page (pick or drop an image: its n-best captions with their log-probabilities and,
for attention models, each word's attention over the image); ``POST /caption`` takes the image as
the multipart field ``file`` and answers JSON (``captioning.serve.app``).
"""

from captioning.serve.app import create_app
from captioning.serve.cli import main

__all__ = ["create_app", "main"]
