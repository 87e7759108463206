"""Image transforms. No flips or crops: captions say "left of", so geometry must be preserved."""

from collections.abc import Sequence

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_image_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Resize to a square ``image_size`` and normalise: PIL image -> (3, image_size, image_size) float."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
