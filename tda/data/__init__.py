"""Data: the shipped MNIST subset, the forms the Python API takes (tensors, datasets, loaders),
image columns and query files."""
