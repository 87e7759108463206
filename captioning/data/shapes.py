"""Built-in synthetic dataset "shapes": small images of coloured shapes with human-like captions.

It lets ``python train.py`` run end to end with no download, through the same COCO-format files,
loader, tokenizer and vocabulary as real data. Generation is seeded and deterministic (same config,
same bytes). The dataset is written to a temporary sibling folder and renamed into place, with a
manifest of every file's SHA-256 written last, so a half-written or altered dataset is detected and
regenerated instead of silently used.
"""

import json
import logging
import os
import random
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioning.data.datasets import SPLITS
from captioning.data.files import MANIFEST_NAME, locked, remove_leftovers, replace_directory, sha256_file
from captioning.progress import progress_bar

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")

# Words a caption may use for each canonical attribute (repeats weight the common choice).
SHAPE_WORDS = {
    "circle": ("circle", "circle", "circle", "disc", "dot"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "diamond", "rhombus"),
}
COLOR_WORDS = {color: (color,) for color in COLORS} | {"purple": ("purple", "purple", "violet")}
SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "big", "big")}
OBJECT_WORDS = ("shapes", "shapes", "objects", "figures")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate; any change produces a different dataset (the manifest records it)."""

    num_train: int = 1500
    num_val: int = 100
    num_test: int = 200
    image_size: int = 64
    captions_per_image: int = 5
    seed: int = 0

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


@dataclass(frozen=True)
class PlacedShape:
    """One shape in a scene; ``x``, ``y`` are its centre and ``extent`` its width in pixels."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    extent: float


def ensure_shapes_dataset(root: str | os.PathLike, config: ShapesConfig) -> Path:
    """Return ``root`` once it holds a verified shapes dataset for ``config``, generating it if needed.

    Raises ``FileExistsError`` if ``root`` holds files that this generator did not write (no
    manifest): those are never deleted. Staging folders a killed generator left beside ``root``
    are removed, under the lock every generator holds while writing (so none is a live writer's).
    """
    root = Path(root)
    leftovers = [f".{root.name}.tmp-*", f".{root.name}.stale-*"]  # _generate's staging, replace_directory's
    if verify_shapes_dataset(root, config) and not any(any(root.parent.glob(p)) for p in leftovers):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.parent / f".{root.name}.lock"):  # other processes wait, then find it ready
        remove_leftovers(root.parent, leftovers)
        if not verify_shapes_dataset(root, config):
            _generate(root, config)
    return root


def _generate(root: Path, config: ShapesConfig) -> None:
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST_NAME).exists():
        raise FileExistsError(
            f"{root} is not empty and has no {MANIFEST_NAME}, so it was not written by the shapes "
            "generator; move it away or point data.root elsewhere (it is never deleted automatically)"
        )
    if root.exists():
        log.warning("shapes dataset at %s is incomplete, altered or from another config: regenerating", root)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        log.info("generating the shapes dataset in %s", root)
        write_shapes_dataset(staging, config)
        replace_directory(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_shapes_dataset(root: Path, config: ShapesConfig) -> bool:
    """True when ``root`` has a manifest for ``config`` and every listed file has its recorded hash."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("config") != asdict(config):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for relative_path, digest in files.items():
        try:
            if sha256_file(root / relative_path) != digest:
                return False
        except OSError:
            return False
    return True


def write_shapes_dataset(root: Path, config: ShapesConfig, progress: bool = True) -> None:
    """Write images, ``annotations/captions_{split}.json`` and, last, the manifest under ``root``
    (with a progress bar on stderr: the default dataset takes a while)."""
    with progress_bar(progress) as bar:
        task = bar.add_task("generating the shapes dataset", total=sum(config.num_images(s) for s in SPLITS))
        _write_shapes_dataset(root, config, lambda: bar.advance(task))


def _write_shapes_dataset(root: Path, config: ShapesConfig, advance: Callable[[], None]) -> None:
    files: dict[str, str] = {}
    next_image_id, next_caption_id = 1, 1
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(f"shapes/{config.seed}/{split}")
        noise = np.random.default_rng([config.seed, split_index])
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True)
        images, annotations = [], []
        for _ in range(config.num_images(split)):
            scene = sample_scene(rng, config.image_size)
            file_name = f"{next_image_id:06d}.png"
            render_scene(scene, config.image_size, noise).save(image_dir / file_name, optimize=False)
            files[f"images/{split}/{file_name}"] = sha256_file(image_dir / file_name)
            images.append({
                "id": next_image_id, "file_name": file_name,
                "width": config.image_size, "height": config.image_size,
                "shapes": [asdict(s) for s in scene],
            })
            for caption in describe_scene(scene, rng, config.captions_per_image, config.image_size):
                annotations.append({"id": next_caption_id, "image_id": next_image_id, "caption": caption})
                next_caption_id += 1
            next_image_id += 1
            advance()
        coco = {
            "info": {"description": f"captioning built-in shapes dataset, {split} split",
                     "version": str(GENERATOR_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
        }
        annotation_file = root / "annotations" / f"captions_{split}.json"
        annotation_file.parent.mkdir(exist_ok=True)
        annotation_file.write_text(json.dumps(coco, indent=1))
        files[f"annotations/{annotation_file.name}"] = sha256_file(annotation_file)
    manifest = {"generator_version": GENERATOR_VERSION, "config": asdict(config), "files": files}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def sample_scene(rng: random.Random, image_size: int) -> list[PlacedShape]:
    """1-3 shapes in distinct columns, ordered left to right."""
    count = rng.choice((1, 2, 2, 3, 3))
    column_width = image_size / count
    scene = []
    for column in range(count):
        size = rng.choice(SIZES)
        extent = image_size * (0.36 if size == "large" else 0.2) * (1.0 if count < 3 else 0.8)
        margin = extent / 2 + 1
        x_low = max(column * column_width + margin, margin)
        x_high = min((column + 1) * column_width - margin, image_size - margin)
        x = rng.uniform(x_low, max(x_low, x_high))
        y = rng.uniform(margin, image_size - margin)
        scene.append(PlacedShape(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, x, y, extent))
    return scene


def render_scene(scene: list[PlacedShape], image_size: int, noise: np.random.Generator) -> Image.Image:
    """Draw the scene anti-aliased (supersampled) on a light, slightly noisy background."""
    scale = SUPERSAMPLE
    background = tuple(int(v) for v in noise.integers(225, 256, size=3))
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), background)
    draw = ImageDraw.Draw(canvas)
    for shape in scene:
        jitter = noise.integers(-15, 16, size=3)
        color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[shape.color], jitter))
        cx, cy, r = shape.x * scale, shape.y * scale, shape.extent * scale / 2
        if shape.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif shape.shape == "square":
            side = r * 0.9
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=color)
        elif shape.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=color)
    pixels = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.LANCZOS), dtype=np.int16)
    pixels = pixels + noise.integers(-6, 7, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def describe_scene(scene: list[PlacedShape], rng: random.Random, count: int, image_size: int) -> list[str]:
    """``count`` distinct captions that vary as human ones do: synonyms, order, optional details."""
    templates = _TEMPLATES[len(scene)]
    captions: list[str] = []
    for _ in range(count * 50):
        caption = _fill(rng.choice(templates), scene, rng, _region(scene[0], image_size))
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            return captions
    raise RuntimeError(f"could not write {count} distinct captions for {scene}")


def _phrase(shape: PlacedShape, rng: random.Random, size_probability: float = 0.5) -> str:
    """``"[size] colour shape"``, the size said only sometimes."""
    words = [rng.choice(COLOR_WORDS[shape.color]), rng.choice(SHAPE_WORDS[shape.shape])]
    if rng.random() < size_probability:
        words.insert(0, rng.choice(SIZE_WORDS[shape.size]))
    return " ".join(words)


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _region(shape: PlacedShape, image_size: int) -> str:
    """Where a lone shape sits, by thirds of the image: "top left", "middle", "bottom", ..."""
    row, column = (min(int(3 * v / image_size), 2) for v in (shape.y, shape.x))
    return _REGIONS[row][column]


_REGIONS = (("top left", "top", "top right"), ("left", "middle", "right"),
            ("bottom left", "bottom", "bottom right"))


def _shape_listing(shapes: list[PlacedShape], rng: random.Random) -> str:
    phrases = [_article(_phrase(s, rng)) for s in shapes]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# Caption templates: text with fields that ``_fill`` replaces left to right (see there).
OPENERS = ("", "", "", "an image of ", "a picture of ", "a drawing of ", "a simple image with ")
BACKGROUNDS = ("", "", " on a white background", " on a plain background", " against a light background")
_WORD_FIELDS = {"opener": OPENERS, "background": BACKGROUNDS, "objects": OBJECT_WORDS}
_TEMPLATES = {
    1: ("{opener}{a0}{background}", "there is {a0} in the {where}", "a single {p0}{background}",
        "one {p0} in the {where} of the image", "{a0+} near the {where}",
        "{opener}{a0} {placed|sitting|drawn} in the {where}", "only one shape, {a0}"),
    2: ("{a0} {left of|to the left of} {a1}", "{a1} {right of|to the right of} {a0}", "{opener}{all}{background}",
        "{|there are }two {objects}: {shuffled}", "{a0} {next to|beside} {a1}", "{shuffled} side by side",
        "{a0} on the left and {a1} on the right", "two {objects} including {any}"),
    3: ("{|there are }three {objects}: {all}", "{all} from left to right", "{a0} left of {rest}",
        "{a1} between {ends}", "three {objects} including {any}", "{opener}{shuffled}{background}",
        "{all} in a row", "a row of three {objects} with {a1} in the middle"),
}


def _fill(template: str, scene: list[PlacedShape], rng: random.Random, where: str) -> str:
    """The template with its fields replaced in order, so that the random draws (and the dataset) are fixed.

    Fields: ``{opener}``, ``{background}``, ``{objects}`` (a word from ``_WORD_FIELDS``);
    ``{x|y}`` (one of the alternatives); ``{where}`` (the first shape's region); ``{a0}``, ``{a1}``
    (shape 0 or 1 with its article; ``{a0+}`` says its size more often) and ``{p0}`` (without);
    ``{any}`` (a random shape, with article); listings of ``{all}`` shapes, ``{shuffled}`` (all,
    in random order), the ``{rest}`` after the first, and the two ``{ends}``.
    """
    text = []
    for literal, field, _, _ in string.Formatter().parse(template):
        text.append(literal)
        if field is not None:
            text.append(_field(field, scene, rng, where))
    return "".join(text)


def _field(field: str, scene: list[PlacedShape], rng: random.Random, where: str) -> str:
    """One field's text (see ``_fill``)."""
    if field in _WORD_FIELDS:
        return rng.choice(_WORD_FIELDS[field])
    if "|" in field:
        return rng.choice(field.split("|"))
    if field == "where":
        return where
    if field[0] in "ap" and field[1:2].isdigit():
        phrase = _phrase(scene[int(field[1])], rng, 0.8 if field.endswith("+") else 0.5)
        return _article(phrase) if field[0] == "a" else phrase
    if field == "any":
        return _article(_phrase(rng.choice(scene), rng))
    if field == "shuffled":
        return _shape_listing(rng.sample(scene, len(scene)), rng)
    return _shape_listing({"all": scene, "rest": scene[1:], "ends": [scene[0], scene[-1]]}[field], rng)
