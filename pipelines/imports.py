"""Import a user's object from a ``"module:name"`` or ``"path/to/file.py:name"`` string.

A run folder records the import strings of the config that made it (``model.factory``,
``data.collate``, ...), so a folder someone hands you can name code. Commands that read a run
folder rather than a config (``tda query``, ``tda serve``, ``tda report``) therefore import such
code only when the user opts in with ``--trust-code`` (as ``transformers`` asks for
``trust_remote_code``): :func:`untrusted_run` marks the process, and :func:`import_object`
refuses while it is marked. Commands given a config (``tda run | validate | curate | unlearn``)
run the code that config names: the user chose it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tda.errors import ConfigError


class CodeTrustError(ConfigError):
    """A run folder names code that the user has not agreed to run."""


#: the run folder whose recorded code may not run in this process (None: no restriction)
_UNTRUSTED: list[str] = []


@contextmanager
def untrusted_run(root: str | Path, trusted: bool) -> Iterator[None]:
    """Within the block, code named by the run folder ``root`` is imported only if ``trusted``."""
    if not trusted:
        _UNTRUSTED.append(str(root))
    try:
        yield
    finally:
        if not trusted:
            _UNTRUSTED.pop()


def import_object(spec: str, code_dir: str | None = None, key: str = "import string") -> Any:
    """The object ``spec`` names.

    Args:
        spec: ``"package.module:attr"`` (importable from ``sys.path`` or ``code_dir``) or
            ``"/path/file.py:attr"`` (loaded from the file; paths in configs are made absolute).
        code_dir: folder searched first for ``module`` (the config file's folder).
        key: the config key, named in errors.

    Raises:
        ConfigError: a malformed string, a module that cannot be imported (naming the search
            path), or a missing attribute.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key} {spec!r} must look like 'module:name' or 'path/file.py:name'")
    if _UNTRUSTED:
        raise CodeTrustError(f"the run folder {_UNTRUSTED[-1]} names code to run ({key} {spec}, from "
                             f"{code_dir or 'its path'}); a run folder can carry code, so it runs only when you say "
                             "so: pass --trust-code if you trust where the folder came from")
    if module_name.endswith(".py"):
        module = _load_file(Path(module_name), key)
    else:
        if code_dir and code_dir not in sys.path:
            sys.path.insert(0, code_dir)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            where = [p for p in ([code_dir] if code_dir else []) + sys.path[:6] if p]
            raise ConfigError(f"{key}: module {module_name!r} cannot be imported ({exc}); searched {where}: put "
                              "it beside the config file, install it, or write 'path/to/file.py:name'") from exc
    if not hasattr(module, attr):
        raise ConfigError(f"{key}: {module_name} has no {attr!r}; names in it: "
                          f"{sorted(n for n in vars(module) if not n.startswith('_'))[:12]}")
    return getattr(module, attr)


def _load_file(path: Path, key: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{key}: file {path} does not exist")
    name = "tda_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]  # the same in every process
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # picklable by reference within this process
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the file's own imports of its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"{key}: running {path} failed: {type(exc).__name__}: {exc}") from exc
    return module
