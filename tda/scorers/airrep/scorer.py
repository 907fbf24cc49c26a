"""AirRep-style scorer: a learned encoder head on frozen representations (docs/methods.md section 5).

``tau(z)_i = <E(h(z)), E(h(z_i))>`` with ``h`` the representations of the FeatureBlock's M
checkpoints concatenated (M*H values, from :class:`tda.featurizers.representations.RepresentationFeaturizer`)
and standardised with the training set's statistics, and ``E`` the head trained by
:func:`tda.scorers.airrep.head.train_head` on subset-retraining data (:class:`tda.scorers.airrep.head.AirRepData`). Both
transforms are ``E(standardised h)``, so the kernel and the FAISS index score it like any other
scorer. The loss weights ``q`` of the blocks are ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import torch

from tda.scorers.airrep.head import AirRepData, EncoderHead, HeadConfig, TrainedHead, train_head
from tda.errors import ConfigError, DataError, ShapeError, TDAError
from tda.core.features import FeatureBlock, FeatureSource, concat_blocks
from tda.scorers.base import Scorer
from tda.scorers.tracin import check_finite_rows


def _flat(feats: np.ndarray) -> np.ndarray:
    """(M, b, H) -> (b, M*H), checkpoint-major per example."""
    m_count, b, h = feats.shape
    return np.transpose(np.asarray(feats, dtype=np.float32), (1, 0, 2)).reshape(b, m_count * h)


class AirRepScorer(Scorer):
    """Inner products of learned embeddings ``E(h)`` (module docstring).

    Args:
        data: the supervision, or a callable ``data(progress=...)`` returning it (called once, by :meth:`fit`: the
            pipelines pass one that runs or resumes the subset retrainings). Not needed to load
            a saved state.
        head: head architecture and training settings (default :class:`HeadConfig`).
        progress: log the training loss and held-out ranking.
    """

    name = "airrep"

    def __init__(self, data: AirRepData | Callable[[], AirRepData] | None = None, head: HeadConfig | None = None,
                 progress: bool = False) -> None:
        self.data = data
        self.config = head if head is not None else HeadConfig()
        self.progress = progress
        self.fitted: TrainedHead | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.config)

    def fit(self, train: FeatureSource, progress: bool = False) -> "AirRepScorer":
        """Train the head on the supervision against the training representations ``train``.

        Raises:
            TDAError: no supervision was given. DataError: the training ids differ from the
                supervision's mask columns. ShapeError: query and training widths differ.
        """
        data = self.data(progress=progress) if callable(self.data) else self.data
        if data is None:
            raise TDAError("AirRepScorer needs subset-retraining data to fit: pass data=AirRepData(...) (or a "
                           "callable returning it), or load a fitted state with load_state_dict")
        block = concat_blocks(list(train.iter_blocks()))
        if not np.array_equal(block.ids, data.train_ids):
            raise DataError(f"the training features' ids ({len(block)} examples) differ from the AirRep supervision's "
                            f"training ids ({len(data.train_ids)}); compute the subsets over this training set")
        if block.feats.shape[0] != data.query_feats.shape[0] or block.feats.shape[2] != data.query_feats.shape[2]:
            raise ShapeError(f"training representations are (M, n, H) = {block.feats.shape}, the training queries' "
                             f"{data.query_feats.shape}; featurize both with the same checkpoints and module")
        self.fitted = train_head(_flat(block.feats), _flat(data.query_feats), data.masks, data.outputs, self.config,
                                 progress=progress or self.progress)
        return self

    def _embed(self, block: FeatureBlock, what: str) -> np.ndarray:
        if self.fitted is None:
            raise TDAError("AirRepScorer is not fitted: call fit(train_features) or load_state_dict first")
        x = _flat(block.feats)
        if x.shape[1] != len(self.fitted.mean):
            raise ShapeError(f"representations are {x.shape[1]} wide (M*H), the fitted head takes "
                             f"{len(self.fitted.mean)}; use the checkpoints and module it was fitted on")
        with torch.no_grad():
            e = self.fitted.head(torch.from_numpy((x - self.fitted.mean) / self.fitted.std))  # (b, D)
        return check_finite_rows(e.numpy().astype(np.float32), block.ids, f"AirRep {what} vectors")

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, D) float32: ``E(h(z_i))``."""
        return self._embed(block, "train")

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, D) float32: ``E(h(z))``."""
        return self._embed(block, "query")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Head weights, input standardisation, settings (as JSON text) and the training curve."""
        if self.fitted is None:
            raise TDAError("AirRepScorer is not fitted: nothing to save")
        f = self.fitted
        weights = {f"head.{k}": v.detach().numpy().copy() for k, v in f.head.state_dict().items()}
        return {**weights, "mean": f.mean, "std": f.std, "config": np.array(json.dumps(self.hyperparameters())),
                "loss": np.asarray(f.loss, dtype=np.float64), "val_spearman": np.asarray(f.val_spearman, np.float64),
                "best_step": np.array(f.best_step)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "AirRepScorer":
        """Rebuild the fitted head; its settings must equal this scorer's."""
        missing = {"mean", "std", "config"} - set(state)
        if missing:
            raise TDAError(f"AirRep state is missing {sorted(missing)}; refit the scorer")
        saved = json.loads(str(state["config"]))
        if saved != self.hyperparameters():
            raise ConfigError(f"saved AirRep head used settings {saved}, this scorer {self.hyperparameters()}; "
                              "refit it or construct the scorer with the saved settings")
        mean = np.asarray(state["mean"], dtype=np.float32)
        head = EncoderHead(len(mean), self.config.width, self.config.hidden)
        try:
            head.load_state_dict({k[len("head."):]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                  if k.startswith("head.")})
        except RuntimeError as exc:
            raise TDAError(f"AirRep head weights do not fit the saved settings ({exc}); refit the scorer") from exc
        self.fitted = TrainedHead(head.eval(), mean, np.asarray(state["std"], dtype=np.float32),
                                  np.asarray(state.get("loss", [])).tolist(),
                                  np.asarray(state.get("val_spearman", [])).tolist(),
                                  int(state.get("best_step", self.config.steps)))
        return self


__all__ = ["AirRepScorer"]
