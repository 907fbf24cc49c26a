"""tda: training-data attribution with projected per-example gradients.

Public API: :class:`Attributor` (featurize, fit, score in memory), tasks
(:class:`ClassificationTask`), :class:`Projector`, scorers (:class:`TRAKScorer`, TracIn, RepSim,
:class:`AirRepScorer`), the scoring
kernel (:func:`score_matrix`, :func:`top_k`) and the error hierarchy. Hugging Face transformers
models: :mod:`tda.hf` (:class:`HFClassificationTask`, :class:`HFCausalLMTask`, :func:`load_hf_model`).

The names are imported lazily (PEP 562): ``import tda`` or ``import tda.errors`` loads neither
torch nor the scorers, so numpy-only readers of a run (``tda query`` on stored features) start
fast; ``tda.Attributor`` or ``from tda import Attributor`` imports what it needs on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "Attributor": "api", "TDAError": "errors", "ArrayFeatures": "features", "FeatureBlock": "features",
    "Featurizer": "featurize", "HFCausalLMTask": "hf", "HFClassificationTask": "hf", "load_hf_model": "hf",
    "TopK": "kernel", "score_matrix": "kernel", "top_k": "kernel", "Projector": "projectors",
    "RepresentationFeaturizer": "representations", "hidden_states": "representations",
    "AirRepScorer": "scorers", "GradCosScorer": "scorers", "GradDotScorer": "scorers", "RepSimScorer": "scorers",
    "Scorer": "scorers", "TracInCPScorer": "scorers", "TRAKScorer": "scorers", "make_scorer": "scorers",
    "ClassificationTask": "tasks", "Task": "tasks",
    "CheckpointRecorder": "recording",
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
    from .api import Attributor
    from .errors import TDAError
    from .features import ArrayFeatures, FeatureBlock
    from .featurize import Featurizer
    from .hf import HFCausalLMTask, HFClassificationTask, load_hf_model
    from .kernel import TopK, score_matrix, top_k
    from .projectors import Projector
    from .representations import RepresentationFeaturizer, hidden_states
    from .scorers import (AirRepScorer, GradCosScorer, GradDotScorer, RepSimScorer, Scorer, TracInCPScorer,
                          TRAKScorer, make_scorer)
    from .tasks import ClassificationTask, Task
    from .recording import CheckpointRecorder
