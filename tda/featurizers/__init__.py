"""Featurizers: a task's per-example gradients (or representations) projected per checkpoint,
the typed projection specs and the default (``auto``) choice."""
