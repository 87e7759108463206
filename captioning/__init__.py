"""captioning: CNN encoder + RNN decoder image captioning with COCO-style evaluation."""

__version__ = "0.1.0"
