"""Scoring time: this project's evaluator vs pycocoevalcap's ``COCOEvalCap`` on the same captions.

Results are held-out real COCO captions (each image's first caption, scored against the others);
both scorers run BLEU 1-4, METEOR, ROUGE_L and CIDEr (SPICE left out of both: it cannot run
offline). The numbers must be identical. Ours is timed twice: a new evaluator (its METEOR Java
process starts cold, as COCOEvalCap's does) and a second call on the same one. Prints a table and writes JSON (``--json FILE``).

    python benchmarks/evaluation.py --images 5000 --json evaluation.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

from pycocoevalcap.eval import COCOEvalCap
from pycocotools.coco import COCO
from rich.console import Console
from rich.table import Table

from captioning.data.datasets import load_coco_references, read_json_file
from captioning.evaluation.coco import METRICS, CocoCaptionEvaluator

DEFAULT_ANNOTATIONS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-mini"
                       / "annotations" / "captions_val2017.json")


class _NoSpice:
    """Stands in for pycocoevalcap's SPICE, which downloads CoreNLP and fails offline."""

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


def held_out(annotation_file: Path, images: int, workdir: Path) -> tuple[Path, Path, dict[int, str]]:
    """Annotations without each image's first caption, a results file holding those captions."""
    data = read_json_file(annotation_file, "annotation file")
    chosen = {image["id"] for image in data["images"][:images]}
    results: dict[int, str] = {}
    kept = []
    for annotation in data["annotations"]:
        if annotation["image_id"] not in chosen:
            continue
        if annotation["image_id"] in results:
            kept.append(annotation)
        else:
            results[annotation["image_id"]] = annotation["caption"]
    references = workdir / "references.json"
    references.write_text(json.dumps(data | {"annotations": kept,
                                             "images": [i for i in data["images"] if i["id"] in chosen]}))
    results_file = workdir / "results.json"
    results_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results.items()]))
    return references, results_file, results


def score_reference(references: Path, results_file: Path) -> dict[str, float]:
    coco = COCO(str(references))
    evaluation = COCOEvalCap(coco, coco.loadRes(str(results_file)))
    with mock.patch("pycocoevalcap.eval.Spice", _NoSpice):
        evaluation.evaluate()
    return {name: evaluation.eval[name] for name in METRICS}


def score_ours(references: Path, results: dict[int, str]) -> tuple[dict[str, float], float, float]:
    """Metrics, seconds for a fresh evaluator (Java started cold), seconds for a second call on it
    (as validation reuses its evaluator every epoch)."""
    start = time.perf_counter()
    with CocoCaptionEvaluator(load_coco_references(references), spice=False) as evaluator:
        metrics = evaluator.score(results).metrics
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = evaluator.score(results).metrics
        warm = time.perf_counter() - start
    assert again == metrics
    return metrics, cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        references, results_file, results = held_out(args.annotations, args.images, Path(workdir))
        start = time.perf_counter()
        expected = score_reference(references, results_file)
        reference_s = time.perf_counter() - start
        ours, ours_s, warm_s = score_ours(references, results)
    identical = all(abs(ours[name] - expected[name]) <= 1e-9 for name in METRICS)
    table = Table(title=f"scoring {len(results)} captions (BLEU, METEOR, ROUGE_L, CIDEr)")
    for column in ("scorer", "seconds", "CIDEr"):
        table.add_column(column, justify="right")
    table.add_row("COCOEvalCap", f"{reference_s:.2f}", f"{expected['CIDEr']:.6f}")
    table.add_row("CocoCaptionEvaluator, new", f"{ours_s:.2f}", f"{ours['CIDEr']:.6f}")
    table.add_row("CocoCaptionEvaluator, reused", f"{warm_s:.2f}", f"{ours['CIDEr']:.6f}")
    Console().print(table)
    Console().print(f"time ratio ours / COCOEvalCap: new evaluator {ours_s / reference_s:.2f}, reused "
                    f"{warm_s / reference_s:.2f}; identical numbers: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "captions": len(results), "cocoevalcap_seconds": reference_s, "ours_seconds": ours_s,
            "ours_reused_seconds": warm_s, "time_ratio": ours_s / reference_s,
            "time_ratio_reused": warm_s / reference_s, "identical_numbers": identical,
            "metrics": ours, "reference_metrics": expected}, indent=2))


if __name__ == "__main__":
    main()
