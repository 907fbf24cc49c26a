"""tda: training-data attribution with projected per-example gradients.

Public API: :class:`Attributor` (featurize, fit, score in memory), tasks
(:class:`ClassificationTask`), :class:`Projector`, scorers (:class:`TRAKScorer`, TracIn, RepSim,
:class:`AirRepScorer`), the scoring
kernel (:func:`score_matrix`, :func:`top_k`) and the error hierarchy. Hugging Face transformers
models: :mod:`tda.hf` (:class:`HFClassificationTask`, :class:`HFCausalLMTask`, :func:`load_hf_model`).
"""

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

__version__ = "0.1.0"

__all__ = [
    "Attributor", "ArrayFeatures", "ClassificationTask", "FeatureBlock", "Featurizer", "Projector",
    "Scorer", "TDAError", "TRAKScorer", "Task", "TopK", "make_scorer", "score_matrix", "top_k",
    "TracInCPScorer", "GradDotScorer", "GradCosScorer", "RepSimScorer", "RepresentationFeaturizer",
    "hidden_states", "AirRepScorer", "HFClassificationTask", "HFCausalLMTask", "load_hf_model",
]
