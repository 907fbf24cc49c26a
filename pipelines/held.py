"""What a command reads from a run's data, read once: data sets and per-example predictions.

Inside :func:`holding` (``tda`` enters it for every command through
:func:`pipelines.methods.bound.one_command`) :func:`held` keeps the value ``make()`` returns under
a key, together with a marker of the run folder it was asked for and of the files it was read
from (path, size, modification and change times, inode). The next :func:`held` with the same key
returns the kept value while the marker is the same, and calls ``make()`` again (keeping only the
new value) once it differs: a stage that writes what a later stage reads (the diffusion train
stage's generated queries, a retrained checkpoint) is seen by it. :func:`pipelines.methods.bound.bind`
keeps a command's bound runs here too.
Outside :func:`holding` (library calls, tests, dask workers) every call is ``make()``.

Nothing random is held: a data set load draws from no global random state (subsets, label noise
and shuffles take their own seeds), so reading a data set once or nine times gives one answer.
Models are not held (a model is mutated by training and by loading a checkpoint into it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

T = TypeVar("T")
_HELD: dict[tuple, tuple[tuple, Any]] | None = None
_LOCK = threading.Lock()


@contextmanager
def holding() -> Iterator[None]:
    """Within: :func:`held` keeps what it reads until the files it was read from change."""
    global _HELD
    saved, _HELD = _HELD, {}
    try:
        yield
    finally:
        _HELD = saved


def config_key(cfg: RunConfig) -> str:
    """The configuration (every key), as part of a key of :func:`held`."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def files_marker(files: Iterable[Path]) -> tuple:
    """Each file's path and :func:`stores.digests.stat_stamp`; (path, None) for one that does not exist."""
    from stores.digests import stat_stamp  # here, not at import: `tda` imports this before numpy's thread limits

    out = []
    for f in files:
        try:
            out.append((str(f), *stat_stamp(Path(f).stat())))
        except FileNotFoundError:
            out.append((str(f), None))
    return tuple(out)


def held(key: tuple, files: Callable[[], Iterable[Path]], make: Callable[[], T], folder: RunPaths | None = None) -> T:
    """``make()``, kept under ``key`` inside :func:`holding` while it is asked for the same run
    ``folder`` and ``files()`` are unchanged. One value per key: asked for another folder (or
    none), it is made again and replaces the kept one, so a command keeps one copy of a data set."""
    if _HELD is None:
        return make()
    marker = (None if folder is None else str(folder.root), files_marker(files()))
    with _LOCK:
        kept = _HELD.get(key)
    if kept is not None and kept[0] == marker:
        return kept[1]
    value = make()  # an exception is not kept: the next call tries again
    with _LOCK:
        _HELD[key] = (marker, value)
    return value
