"""Self-critical sequence training (SCST; Rennie et al., 2017): maximise a caption reward (CIDEr-D) directly.

For each image the model samples ``samples`` captions; each is rewarded with CIDEr-D against the
image's training references, minus a baseline, and the loss is ``-(reward - baseline) * log p(word)``
summed over every generated word (``<eos>`` included) and divided by the number of those words.
Baselines: ``greedy``, the reward of the image's greedy caption (Rennie et al.), and ``mean``, the
mean reward of the image's other samples (Luo, 2020, "A Better Variant of Self-Critical Sequence
Training"), which needs no extra decoding.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from captioning.decoding import DecodedCaptions
from captioning.errors import check_choice

BASELINES = ("mean", "greedy")
Reward = Callable[[Sequence[int], Sequence[str]], np.ndarray]  # (image ids, captions) -> (captions,) rewards


@dataclass(frozen=True)
class ScstSettings:
    """``model.scst``: from ``start_epoch`` on, train by SCST instead of cross-entropy."""

    samples: int = 5
    baseline: str = "mean"
    max_length: int = 16
    start_epoch: int = 0

    def __post_init__(self) -> None:
        check_choice(self.baseline, BASELINES, "model.scst.baseline")
        lowest = 2 if self.baseline == "mean" else 1  # the mean of the *other* samples needs two
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < lowest:
            raise ValueError(f"model.scst.samples must be an integer >= {lowest} with the {self.baseline} baseline, "
                             f"got {self.samples!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"model.scst.max_length must be an integer >= 1, got {self.max_length!r}")
        if isinstance(self.start_epoch, bool) or not isinstance(self.start_epoch, int) or self.start_epoch < 0:
            raise ValueError(f"model.scst.start_epoch must be an integer >= 0, got {self.start_epoch!r}")


@dataclass
class ScstStep:
    """One SCST batch: the loss, and what a run logs to show whether it learns."""

    loss: torch.Tensor
    reward: float  # mean reward of the samples
    baseline: float  # mean baseline
    advantage: float  # mean |reward - baseline|
    sample_length: float  # mean words per sample, <eos> included
    entropy: float  # per-word entropy of the sampling distribution (mean -log p of the sampled words)


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """(images, samples) -> each sample's baseline: the mean reward of the same image's other samples."""
    samples = rewards.shape[1]
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (samples - 1)


def self_critical_loss(word_log_probs: torch.Tensor, lengths: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """``-advantage * sum log p`` over each sample's generated words (``<eos>`` counted), per word.

    word_log_probs: (rows, steps), 0 after ``<eos>``; lengths: (rows,) words with ``<eos>``; advantage: (rows,).
    """
    steps = torch.arange(word_log_probs.shape[1], device=word_log_probs.device)  # (steps,)
    mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).to(word_log_probs.dtype)  # (rows, steps)
    weighted = -advantage.unsqueeze(1).to(word_log_probs.dtype) * word_log_probs * mask  # (rows, steps)
    return weighted.sum() / mask.sum().clamp(min=1)


def scst_step(samples: DecodedCaptions, greedy: DecodedCaptions | None, image_ids: Sequence[int],
              captions: Callable[[DecodedCaptions], list[str]], reward: Reward, settings: ScstSettings) -> ScstStep:
    """The SCST loss of ``samples`` (``settings.samples`` rows per image, image-major, drawn with gradients).

    ``greedy``: the images' greedy captions (the ``greedy`` baseline; None for ``mean``). ``captions``
    turns decoded rows into the word strings the reward scores.
    """
    n = settings.samples
    sample_ids = [image_id for image_id in image_ids for _ in range(n)]
    rewards = torch.from_numpy(reward(sample_ids, captions(samples))).view(len(image_ids), n)  # (images, n)
    if settings.baseline == "greedy":
        baseline = torch.from_numpy(reward(list(image_ids), captions(greedy))).unsqueeze(1).expand(-1, n)
    else:
        baseline = mean_of_others(rewards)  # (images, n)
    # float64 from the reward; the loss's own dtype on its device (some accelerators have no float64)
    advantage = (rewards - baseline).flatten().to(samples.word_log_probs.device, samples.word_log_probs.dtype)
    loss = self_critical_loss(samples.word_log_probs, samples.lengths, advantage)
    words = samples.lengths.sum().clamp(min=1)
    return ScstStep(loss, rewards.mean().item(), baseline.mean().item(), advantage.abs().mean().item(),
                    samples.lengths.float().mean().item(), (-samples.word_log_probs.detach().sum() / words).item())
