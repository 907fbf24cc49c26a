"""Executors: run independent jobs locally (default) or on a dask cluster, same results.

``map_unordered(fn, items)`` yields ``(item, result)`` as jobs finish, so the driver can record
each result durably the moment it arrives; an interrupted run loses only jobs in flight. Jobs
must be picklable callables that load what they need from paths (never large objects through
the task graph).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

from tda.errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)


class LocalExecutor:
    """Runs jobs one after another in this process."""

    name = "local"

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for item in items:
            yield item, fn(item)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaskExecutor:
    """Runs jobs on ``dask.distributed``: a scheduler at ``address``, or a LocalCluster started here.

    Args:
        address: ``tcp://host:port`` of a running scheduler; ``None`` starts a LocalCluster.
        workers: worker processes of the LocalCluster (one thread each).
    """

    name = "dask"

    def __init__(self, address: str | None = None, workers: int = 2) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - dask is a dependency
            raise MissingDependencyError("the dask executor needs dask[distributed]: pip install 'dask[distributed]'") from exc
        self._cluster = None
        if address:
            try:
                self.client = Client(address, timeout="20s")
            except OSError as exc:
                raise ConfigError(f"cannot reach the dask scheduler at {address} ({exc}); check executor.address") from exc
        else:
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self._cluster)

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        from dask.distributed import as_completed

        items = list(items)
        if not items:
            return
        futures = self.client.map(fn, items, pure=False)
        index = {f.key: item for f, item in zip(futures, items)}
        for fut in as_completed(futures):
            yield index[fut.key], fut.result()

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> "DaskExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(kind: str = "local", address: str | None = None, workers: int = 2) -> LocalExecutor | DaskExecutor:
    """``local`` or ``dask`` (scheduler ``address``, or a LocalCluster of ``workers``)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "dask":
        return DaskExecutor(address, workers)
    raise ConfigError(f"executor {kind!r} is unknown; use 'local' or 'dask'")
