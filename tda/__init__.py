"""tda: training-data attribution with projected per-example gradients.

Public API: :class:`Attributor` (featurize, fit, score in memory), tasks
(:class:`ClassificationTask`), :class:`Projector`, scorers (:class:`TRAKScorer`, TracIn, RepSim,
:class:`AirRepScorer`), the scoring
kernel (:func:`score_matrix`, :func:`top_k`) and the error hierarchy. Hugging Face transformers
models: :mod:`tda.models.hf` (:class:`HFClassificationTask`, :class:`HFCausalLMTask`, :func:`load_hf_model`).

The names are imported lazily (PEP 562): ``import tda`` or ``import tda.errors`` loads neither
torch nor the scorers, so numpy-only readers of a run (``tda query`` on stored features) start
fast; ``tda.Attributor`` or ``from tda import Attributor`` imports what it needs on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tda.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "Attributor": "api", "TDAError": "errors", "ArrayFeatures": "core.features", "FeatureBlock": "core.features",
    "Featurizer": "featurizers.gradient", "HFCausalLMTask": "models.hf", "HFClassificationTask": "models.hf", "load_hf_model": "models.hf",
    "TopK": "core.kernel", "score_matrix": "core.kernel", "top_k": "core.kernel", "Projector": "projections.projectors",
    "RepresentationFeaturizer": "featurizers.representations", "hidden_states": "featurizers.representations",
    "AirRepScorer": "scorers", "GradCosScorer": "scorers", "GradDotScorer": "scorers", "RepSimScorer": "scorers",
    "Scorer": "scorers", "TracInCPScorer": "scorers", "TRAKScorer": "scorers", "make_scorer": "scorers",
    "ClassificationTask": "models.tasks", "Task": "models.tasks",
    "CheckpointRecorder": "models.recording",
}

__all__ = [
    "Attributor", "ArrayFeatures", "ClassificationTask", "FeatureBlock", "Featurizer", "Projector",
    "Scorer", "TDAError", "TRAKScorer", "Task", "TopK", "make_scorer", "score_matrix", "top_k",
    "TracInCPScorer", "GradDotScorer", "GradCosScorer", "RepSimScorer", "RepresentationFeaturizer",
    "hidden_states", "AirRepScorer", "HFClassificationTask", "HFCausalLMTask", "load_hf_model",
    "CheckpointRecorder",
]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports the lazy table stands for
    from tda.api import Attributor
    from tda.errors import TDAError
    from tda.core.features import ArrayFeatures, FeatureBlock
    from tda.featurizers.gradient import Featurizer
    from tda.models.hf import HFCausalLMTask, HFClassificationTask, load_hf_model
    from tda.core.kernel import TopK, score_matrix, top_k
    from tda.projections.projectors import Projector
    from tda.featurizers.representations import RepresentationFeaturizer, hidden_states
    from tda.scorers import (AirRepScorer, GradCosScorer, GradDotScorer, RepSimScorer, Scorer, TracInCPScorer,
                          TRAKScorer, make_scorer)
    from tda.models.tasks import ClassificationTask, Task
    from tda.models.recording import CheckpointRecorder
