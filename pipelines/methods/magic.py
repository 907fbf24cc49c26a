"""The ``magic`` scorer in configs: MAGIC metagradients through the run's own training recipe.

Families whose training is a deterministic recipe that :mod:`tda.scorers.magic` can replay say so with
``magic_recipe(cfg)`` (the classifier family: SGD with momentum, weight decay and a per-epoch
linear schedule, :class:`tda.scorers.magic.SGDRecipe` with ``schedule="epoch-linear"``). The scorer
attributes the run's first model (seed ``train.seed``) exactly: ``scores[j, i] = d f_j / d w_i``.
The fixed-seed small-drop protocol of ``tda validate`` retrains the same run with dropped
examples, so it checks exactly what MAGIC claims.

It costs about 2-3 training runs per chunk of ``query_batch`` queries. It keeps the (m, n) score
matrix in the scorer state (:class:`tda.scorers.PrecomputedScorer`). Only the run's own queries
can be asked for.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tda.data.loading import example_ids
from tda.errors import ConfigError
from tda.scorers import PrecomputedScorer

if TYPE_CHECKING:
    from pipelines.families.base import Family
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

QUERY_BATCH = 16  # queries per reverse pass (memory grows linearly in it)


def magic_scorer(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> PrecomputedScorer:
    """The unfitted MAGIC scorer of a run; :class:`ConfigError` for families without a replayable recipe."""
    recipe_of = getattr(family, "magic_recipe", None)
    if recipe_of is None:
        raise ConfigError(f"score.scorer 'magic' differentiates through training, and the {family.name!r} family's "
                          "training is not a replayable recipe; use it with model.family: classifier, or call "
                          "tda.scorers.magic.magic_scores with your own recipe")
    recipe = recipe_of(cfg)

    def compute(progress: bool) -> tuple[Any, Any, Any]:
        from tda.scorers.magic import magic_scores

        data = family.datasets(cfg, paths)
        scores = magic_scores(lambda: family.build_model(cfg), data["train"], data["query"], family.collate(cfg),
                              recipe, task=family.task(cfg), query_batch=QUERY_BATCH, progress=progress)
        return scores, example_ids(data["query"]), example_ids(data["train"])

    settings = {k: v for k, v in asdict(recipe).items() if k != "loss"}
    return PrecomputedScorer(compute, "magic", {"recipe": type(recipe).__name__, **settings, "model": 0})
