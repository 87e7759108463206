"""Plain ``nn.Module`` components: tensors in, tensors out (no Lightning, Hydra or files)."""
