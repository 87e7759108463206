import json
from pathlib import Path

import pytest
from pycocoevalcap.eval import COCOEvalCap
from pycocotools.coco import COCO

from captioning.evaluation.coco import METRICS, CocoCaptionEvaluator


def _references(annotation_file: Path) -> dict[int, list[str]]:
    references: dict[int, list[str]] = {}
    for annotation in json.loads(annotation_file.read_text())["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return references


def _reference_numbers(annotation_file: Path, results: dict[int, str], tmp_path: Path) -> dict[str, float]:
    """What pycocoevalcap's COCOEvalCap reports, SPICE left out (it cannot run offline)."""
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results.items()]))
    coco = COCO(str(annotation_file))
    evaluation = COCOEvalCap(coco, coco.loadRes(str(results_file)))
    evaluation.params["image_id"] = list(results)
    import pycocoevalcap.eval as reference_module

    spice = reference_module.Spice
    reference_module.Spice = _NoSpice
    try:
        evaluation.evaluate()
    finally:
        reference_module.Spice = spice
    return {name: value for name, value in evaluation.eval.items() if name in METRICS}


class _NoSpice:
    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


def test_scores_equal_cocoevalcap_on_generated_captions(tiny_shapes: Path, tmp_path: Path) -> None:
    annotation_file = tiny_shapes / "annotations" / "captions_test.json"
    references = _references(annotation_file)
    # a plausible "model": another image's caption for half the images, a held-out reference for the rest
    ids = sorted(references)
    results = {i: references[ids[(k + 1) % len(ids)] if k % 2 else i][0] for k, i in enumerate(ids)}
    with CocoCaptionEvaluator(references) as evaluator:
        ours = evaluator.score(results)
    expected = _reference_numbers(annotation_file, results, tmp_path)
    assert set(ours.metrics) == set(METRICS)
    for name in METRICS:
        assert ours.metrics[name] == pytest.approx(expected[name], abs=1e-9), name
    assert set(ours.per_image) == set(ids)
    assert ours.per_image[ids[0]]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)  # its own reference


def test_human_agreement_scores_each_reference_against_the_others() -> None:
    references = {1: ["a red circle", "a red circle", "a red disc"],
                  2: ["two blue squares", "a blue square", "one blue square"]}
    with CocoCaptionEvaluator(references) as evaluator:
        human = evaluator.human_agreement()
    rounds = []
    for j in range(3):
        with CocoCaptionEvaluator({i: r[:j] + r[j + 1:] for i, r in references.items()}) as others:
            rounds.append(others.score({i: r[j] for i, r in references.items()}).metrics)
    for name in METRICS:
        assert human[name] == pytest.approx(sum(r[name] for r in rounds) / 3, abs=1e-12), name
    with CocoCaptionEvaluator({1: ["a red circle"] * 5, 2: ["two blue squares"] * 5}) as unanimous:
        assert unanimous.human_agreement()["ROUGE_L"] == pytest.approx(1.0)


def test_unknown_image_ids_and_empty_results_are_refused() -> None:
    with CocoCaptionEvaluator({1: ["a red circle"]}) as evaluator:
        with pytest.raises(ValueError, match="no references"):
            evaluator.score({2: "a red circle"})
        with pytest.raises(ValueError, match="no captions"):
            evaluator.score({})


def test_close_stops_the_meteor_java_process() -> None:
    evaluator = CocoCaptionEvaluator({1: ["a red circle", "a big red circle"]})
    assert evaluator.score({1: "a red circle"}).metrics["METEOR"] > 0.5
    process = evaluator._meteor.meteor_p
    evaluator.close()
    assert process.poll() is not None
    evaluator.close()
