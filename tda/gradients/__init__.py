"""Per-example gradients (``torch.func``) and captured layer inputs / output gradients."""
