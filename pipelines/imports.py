"""Import a user's object from a ``"module:name"`` or ``"path/to/file.py:name"`` string."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from tda.errors import ConfigError


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
