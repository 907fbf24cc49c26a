"""Staged jobs (train, featurize, index, score), their configs and the ``tda`` CLI."""
