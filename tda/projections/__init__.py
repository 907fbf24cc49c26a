"""Random projections of per-example gradients: dense, sparse (SJLT) and TensorSketch."""
