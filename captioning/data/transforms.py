"""Image transforms. No flips or crops: captions say "left of", so geometry must be preserved."""

from torchvision import transforms


def build_image_transform(image_size: int) -> transforms.Compose:
    """Resize to a square ``image_size``: PIL image -> (3, image_size, image_size) floats in [0, 1].

    Normalisation belongs to the encoder (it depends on the weights), not to the data.
    """
    return transforms.Compose([
        transforms.Resize((image_size, image_size), antialias=True),
        transforms.ToTensor(),
    ])
