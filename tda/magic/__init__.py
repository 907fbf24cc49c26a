"""MAGIC: near-optimal data attribution by exact metagradients through training (docs/methods.md 8).

Example::

    from tda.magic import SGDRecipe, magic_scores

    recipe = SGDRecipe(epochs=4, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=64, seed=0,
                       schedule="cosine")
    state = recipe.train(model_fn, train_ds, collate)            # the run being attributed
    scores = magic_scores(model_fn, train_ds, query_ds, collate, recipe)   # (m, n)
    # scores[j, i] = d f_j / d w_i at w = 1: > 0 means more weight on i raises f_j

Modules: :mod:`.functional` (the model as a pure function, collated data, weights),
:mod:`.recipes` (deterministic SGD / Adam runs written as differentiable updates),
:mod:`.metagradients` (the checkpointed reverse pass).
"""

from .functional import CrossEntropyLoss
from .metagradients import magic_scores
from .recipes import AdamRecipe, Recipe, SGDRecipe

__all__ = ["AdamRecipe", "CrossEntropyLoss", "Recipe", "SGDRecipe", "magic_scores"]
