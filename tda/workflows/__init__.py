"""Workflows on top of the scorers: curation, approximate unlearning and the retraining recipe."""
