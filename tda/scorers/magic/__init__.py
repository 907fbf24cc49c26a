"""MAGIC: near-optimal data attribution by exact metagradients through training (docs/methods.md 8).

Example::

    from tda.scorers.magic import SGDRecipe, magic_scores

    recipe = SGDRecipe(epochs=4, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=64, seed=0,
                       schedule="cosine")
    state = recipe.train(model_fn, train_ds, collate)            # the run being attributed
    scores = magic_scores(model_fn, train_ds, query_ds, collate, recipe)   # (m, n)
    # scores[j, i] = d f_j / d w_i at w = 1: > 0 means more weight on i raises f_j

Modules: :mod:`.functional` (the model as a pure function, collated data, weights),
:mod:`.recipes` (deterministic SGD / Adam runs written as differentiable updates),
:mod:`.metagradients` (the checkpointed reverse pass), :mod:`.precomputed` (the scores of a run as a scorer).
Names are imported on first use, so the numpy-only :mod:`.precomputed` loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tda.lazy import lazy_exports

_EXPORTS = {"CrossEntropyLoss": "functional", "magic_scores": "metagradients", "AdamRecipe": "recipes",
            "Recipe": "recipes", "SGDRecipe": "recipes"}

__all__ = ["AdamRecipe", "CrossEntropyLoss", "Recipe", "SGDRecipe", "magic_scores"]

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from tda.scorers.magic.functional import CrossEntropyLoss
    from tda.scorers.magic.metagradients import magic_scores
    from tda.scorers.magic.recipes import AdamRecipe, Recipe, SGDRecipe
