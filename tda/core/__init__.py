"""The feature containers and the one inner-product kernel every scorer goes through."""
