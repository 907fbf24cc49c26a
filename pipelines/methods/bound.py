"""A run bound once per command: :class:`BoundRun` holds a configuration and its run folder with
what is derived from them, each derived once: the family, the method, the feature kind and the
fitted scorer (read from ``scorer/`` once, again only when its marker changes). Widths are read
from the feature stores' manifests (:func:`pipelines.methods.scorers.slot_width`), never from a
built model.

Inside :func:`one_command` (``tda`` wraps every command in it) :func:`bind` returns the same
:class:`BoundRun` for the same configuration and folder, so the index stage, the score stage and
the report of one ``tda run`` share them; outside it (library calls, tests) every :func:`bind` is
a new one. Inside it a family's data sets and per-example predictions are read once too, and again
when a file they were read from changed (:mod:`pipelines.held`: the diffusion train stage
writes the queries a later stage reads). Models are not held: a model build draws from the random
state that training seeds, and training and checkpoint loads change the module.

This module imports neither torch nor numpy at import time (``tda`` enters :func:`one_command`
before a command sets its thread limits).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pipelines.held import config_key, held, holding

if TYPE_CHECKING:
    from pipelines.families.base import Family
    from pipelines.layout import RunPaths
    from pipelines.spec.method import Method
    from pipelines.spec.schema import RunConfig


class BoundRun:
    """``cfg`` and ``paths`` (None: no run folder) with the family, method, feature kind and fitted
    scorer derived from them once."""

    def __init__(self, cfg: RunConfig, paths: RunPaths | None = None) -> None:
        self.cfg, self.paths = cfg, paths
        self._fitted: tuple[tuple[Any, Any], Any] | None = None

    @cached_property
    def family(self) -> Family:
        from pipelines.families import family_for

        return family_for(self.cfg)

    @cached_property
    def method(self) -> Method:
        from pipelines.spec.method import method_for

        return method_for(self.cfg.score.scorer)

    @cached_property
    def kind(self) -> str:
        """The kind of features the run stores (:func:`pipelines.methods.scorers.feature_kind`)."""
        from pipelines.methods.scorers import feature_kind

        return feature_kind(self.cfg, self.family)

    def scorer(self) -> Any:
        """A new unfitted scorer of the run's method (fitting changes it: never shared)."""
        return self.method.build(self.cfg, self.paths, self.family, self.kind)

    def fitted_scorer(self, load: Callable[[], Any]) -> Any:
        """The fitted scorer ``load()`` reads (and checks) from the run folder, read again only when
        the scorer's marker (fingerprint, sha256 of the state) changed since: a refit in the same
        command is read anew."""
        from stores import scorer_state

        folder = self.paths.scorer if self.paths is not None else None
        key = (None, None) if folder is None else (scorer_state.marker_field(folder, "fingerprint"),
                                                   scorer_state.marker_field(folder, "sha256"))
        if self._fitted is None or self._fitted[0] != key or None in key:
            self._fitted = (key, load())
        return self._fitted[1]


def bind(cfg: RunConfig, paths: RunPaths | None = None) -> BoundRun:
    """The command's :class:`BoundRun` of ``cfg`` and ``paths`` (a new one outside :func:`one_command`)."""
    key = ("bound", config_key(cfg), None if paths is None else str(paths.root))
    return held(key, tuple, lambda: BoundRun(cfg, paths))


def one_command() -> AbstractContextManager[None]:
    """Within: :func:`bind` returns one :class:`BoundRun` per configuration and run folder, and
    data sets and predictions are read once (the scope of :func:`pipelines.held.holding`)."""
    return holding()
