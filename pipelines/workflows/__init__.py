"""``tda curate`` and ``tda unlearn``: curation, its retraining check, unlearning and their reports."""
