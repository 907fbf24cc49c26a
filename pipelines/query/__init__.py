"""Answering queries on a finished run: the lean (torch-free) path, new inputs and ``tda serve``."""
