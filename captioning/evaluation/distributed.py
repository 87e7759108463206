"""Collect per-rank predictions so that a split is scored once, over each image exactly once."""

from typing import Any

import torch.distributed as dist


def gather_predictions(local: dict[int, Any]) -> dict[int, Any]:
    """Merge ``{image_id: prediction}`` from every rank; duplicates (sampler padding) collapse by id."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(local)
    gathered: list[dict[int, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: dict[int, Any] = {}
    for part in gathered:
        for image_id, prediction in part.items():
            merged.setdefault(image_id, prediction)
    return merged


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (so every rank logs the same metrics)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]
