"""Plugin registries, fed by entry points, and the one resolver for plugin names.

``reward_plugins``, ``dataset_plugins``, ``judge_backends`` and ``trainer_plugins`` each map a short name to a
plugin class. They are filled from their entry-point group the first time a name is
looked up, and by :meth:`Registry.register` (also usable as a decorator). Registering the
same object under the same name again is harmless (every Ray worker may call it); a
different object under a taken name raises.

:func:`Registry.resolve` accepts, in order:

* a short name (``persrm_rule``), from the registry;
* a dotted path (``my_pkg.rewards:MyReward`` or ``my_pkg.rewards.MyReward``);
* a Python file (``./my_reward.py`` or ``./my_reward.py:MyReward``; without ``:attr`` the
  file must define exactly one plugin class or a module-level ``PLUGIN``).

An unknown name fails with the list of known names. A plugin that fails to import stops
the run: the user asked for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import threading
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from .contracts import PluginError, check_dataset_plugin, check_reward_plugin, check_trainer_plugin

T = TypeVar("T")


class UnknownPluginError(LookupError):
    pass


class Registry(Generic[T]):
    """A named collection of plugins of one kind."""

    def __init__(self, kind: str, group: str, check: Callable[[str, Any], None] | None = None):
        self.kind, self.group = kind, group
        self._check = check
        self._items: dict[str, Any] = {}
        self._loaded_entry_points = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ registration
    def register(self, name: str, obj: Any = None):
        """Register ``obj`` as ``name``; with one argument, return a decorator."""
        if obj is None:
            def deco(target: Any) -> Any:
                self.register(name, target)
                return target
            return deco
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"{self.kind} plugin name {name!r} must be a Python identifier")
        if self._check is not None:
            self._check(name, obj)
        with self._lock:
            current = self._items.get(name)
            if current is not None and current is not obj:
                raise PluginError(f"{self.kind} plugin {name!r} is already registered as "
                                  f"{_describe(current)}; refusing to replace it with {_describe(obj)}")
            self._items[name] = obj
        return obj

    def _load_entry_points(self) -> None:
        with self._lock:
            if self._loaded_entry_points:
                return
            self._loaded_entry_points = True
            for ep in entry_points(group=self.group):
                if ep.name in self._items:
                    continue
                try:
                    obj = ep.load()
                except Exception as exc:  # a plugin the user may ask for: fail loudly when asked
                    self._items[ep.name] = _Broken(ep.value, exc)
                    continue
                self.register(ep.name, obj)

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def available(self) -> list[str]:
        """Registered and installed names, without importing any plugin (for help texts)."""
        with self._lock:
            names = set(self._items)
        names.update(ep.name for ep in entry_points(group=self.group))
        return sorted(names)

    def get(self, name: str) -> Any:
        self._load_entry_points()
        obj = self._items.get(name)
        if obj is None:
            known = ", ".join(self.names()) or "(none installed)"
            raise UnknownPluginError(f"unknown {self.kind} plugin {name!r}; known: {known}. A dotted path "
                                     "(pkg.mod:Class) or a file (path/to/plugin.py[:Class]) also works.")
        if isinstance(obj, _Broken):
            raise PluginError(f"{self.kind} plugin {name!r} ({obj.value}) failed to load: "
                              f"{type(obj.exc).__name__}: {obj.exc}") from obj.exc
        return obj

    def resolve(self, spec: str) -> Any:
        """A plugin from a short name, a dotted path, or a file (see the module docstring)."""
        if not spec:
            raise UnknownPluginError(f"empty {self.kind} plugin name; known: {', '.join(self.names())}")
        path, _, attr = spec.partition(":") if spec.count(":") == 1 and not os.path.exists(spec) else (spec, "", "")
        if path.endswith(".py") or os.path.isfile(path):
            obj = _load_from_file(path, attr or None, self.kind)
        elif spec.isidentifier():
            return self.get(spec)
        else:
            obj = _load_dotted(spec, self.kind)
        if self._check is not None:
            self._check(spec, obj)
        return obj


class _Broken:
    def __init__(self, value: str, exc: Exception):
        self.value, self.exc = value, exc


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _load_dotted(spec: str, kind: str) -> Any:
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
    else:
        mod_name, _, attr = spec.rpartition(".")
    if not mod_name or not attr:
        raise UnknownPluginError(f"{kind} plugin {spec!r} is neither a registered name nor pkg.mod:Attr")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise PluginError(f"{kind} plugin {spec!r}: cannot import {mod_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{kind} plugin {spec!r}: {mod_name!r} has no attribute {attr!r}") from None
    return obj


def _load_from_file(path: str, attr: str | None, kind: str) -> Any:
    if not os.path.isfile(path):
        raise UnknownPluginError(f"{kind} plugin file {path!r} does not exist")
    mod_name = "_persrm_plugin_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    # In sys.modules while it runs, as an import would be: dataclasses (and pickling) look the module up there.
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"{kind} plugin file {path!r} failed to import: {type(exc).__name__}: {exc}") from exc
    if attr:
        if not hasattr(module, attr):
            raise PluginError(f"{kind} plugin file {path!r} defines no {attr!r}")
        return getattr(module, attr)
    if hasattr(module, "PLUGIN"):
        return module.PLUGIN
    local = [v for v in vars(module).values()
             if inspect.isclass(v) and v.__module__ == mod_name and hasattr(v, "name")]
    if len(local) != 1:
        raise PluginError(f"{kind} plugin file {path!r}: name the plugin as {path}:ClassName "
                          f"(found {len(local)} candidate classes) or define PLUGIN")
    return local[0]


def portable_spec(spec: Any) -> Any:
    """``spec`` with a plugin file's path made absolute, so it names the same file in a process
    started elsewhere (a Ray worker's working directory is not the driver's). Names, dotted
    paths and non-strings are returned unchanged."""
    if not isinstance(spec, str) or not spec:
        return spec
    path, sep, attr = spec.partition(":") if spec.count(":") == 1 and not os.path.exists(spec) else (spec, "", "")
    if path.endswith(".py") or os.path.isfile(path):
        return os.path.abspath(path) + sep + attr
    return spec


reward_plugins: Registry = Registry("reward", "openrlhf_persrm.rewards", check_reward_plugin)
dataset_plugins: Registry = Registry("dataset", "openrlhf_persrm.datasets", check_dataset_plugin)
judge_backends: Registry = Registry("judge", "openrlhf_persrm.judges")
trainer_plugins: Registry = Registry("trainer", "openrlhf_persrm.trainers", check_trainer_plugin)


def instantiate(registry: Registry, spec: str, config: dict[str, Any] | None = None) -> Any:
    """Resolve ``spec`` in ``registry`` and construct it with ``config`` as keyword arguments.

    A plain reward function (``reward_func(queries, prompts, labels)``) is used as it is and
    takes no configuration.
    """
    from .contracts import check_reward_instance, check_trainer_instance, config_error, is_reward_function

    factory = registry.resolve(spec)
    config = dict(config or {})
    if registry is reward_plugins and is_reward_function(factory):
        if config:
            raise ValueError(f"reward plugin {spec!r} is a plain function and takes no configuration; "
                             f"got {config!r}")
        return factory
    try:
        inst = factory(**config)
    except TypeError as exc:
        raise config_error(spec, factory, config, exc) from exc
    if registry is reward_plugins:
        check_reward_instance(spec, inst)
    elif registry is trainer_plugins:
        check_trainer_instance(spec, inst)
    return inst
