"""COCO-style caption evaluation (knows nothing of models: it scores ``{image_id: caption}``)."""

from captioning.evaluation.coco import METRICS, CocoCaptionEvaluator, EvaluationResult

__all__ = ["METRICS", "CocoCaptionEvaluator", "EvaluationResult"]
