"""An import-only stand-in for Ray, for the GPU check machine only (see scripts/gpu/README.md).

Levanter imports Ray at module level (decorators, type names) even for runs that never start a Ray cluster, as
the project's training CLI does (``ray.auto_start_cluster: false``; the token caches are built locally without
Ray). Ray's wheel (about 79 MB for Python 3.12) is larger than everything else the GPU machine lacks together,
and nothing but files of at most 64 MiB in all can be carried there, so ``scripts/gpu/env.sh`` installs this
package instead, and only where ``import ray`` fails.

Every name Levanter touches at import time exists here; anything that would need a Ray runtime (``ray.init``,
``ray.get``, ``ray.put``, ``f.remote(...)``, ...) raises ``RuntimeError`` saying that Ray is not installed.
It is never installed next to a real Ray.
"""

from __future__ import annotations

import sys as _sys
import types as _types

__version__ = "0.0.0+null-moe-stub"
IS_NULL_MOE_STUB = True

_MESSAGE = (
    "Ray is not installed on this machine (null-moe's GPU check carries an import-only stand-in): "
    "this code path needs a Ray runtime"
)


def _unavailable(*_args, **_kwargs):
    raise RuntimeError(_MESSAGE)


class _Placeholder:
    """A class for every Ray type name Levanter imports (annotations, isinstance checks, base classes, and inert
    values such as the ``RuntimeEnv(...)`` arguments of its ``@ray.remote`` decorators)."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __class_getitem__(cls, _item):
        return cls


class _Remote:
    """What ``@ray.remote`` makes of a function or class: calling ``.remote`` needs Ray."""

    def __init__(self, target):
        self._target = target
        self.__wrapped__ = target
        self.__name__ = getattr(target, "__name__", "remote")
        self.__doc__ = getattr(target, "__doc__", None)

    def options(self, *_args, **_kwargs):
        return self

    def remote(self, *_args, **_kwargs):
        raise RuntimeError(_MESSAGE)

    def __call__(self, *_args, **_kwargs):
        raise RuntimeError(_MESSAGE)

    def __getattr__(self, name):  # actor method handles: Actor.method.remote(...)
        if name.startswith("__"):
            raise AttributeError(name)
        return _Remote(getattr(self._target, name, None))


def remote(*args, **kwargs):
    if len(args) == 1 and not kwargs and callable(args[0]):
        return _Remote(args[0])
    return _Remote


def is_initialized() -> bool:
    return False


init = get = put = wait = kill = cancel = shutdown = get_actor = get_runtime_context = _unavailable
ObjectRef = ObjectRefGenerator = _Placeholder


def _module(name: str, **attrs) -> _types.ModuleType:
    module = _types.ModuleType(name, "part of null-moe's import-only Ray stand-in")

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder

    module.__getattr__ = __getattr__  # any other type name Levanter imports from it
    module.__dict__.update(attrs)
    _sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(_sys.modules[parent], child, module)
    return module


for _name in (
    "ray.actor", "ray.runtime_env", "ray.remote_function", "ray.exceptions", "ray.dag", "ray.util",
    "ray.util.scheduling_strategies", "ray.util.queue", "ray.runtime_context", "ray.dashboard",
    "ray.dashboard.modules", "ray.dashboard.modules.job", "ray.dashboard.modules.job.sdk", "ray._private",
    "ray._private.accelerators", "ray.job_submission", "ray.types", "ray.util.state",
):
    _module(_name)

_sys.modules["ray.exceptions"].RayError = type("RayError", (Exception,), {})
for _exc in ("RayTaskError", "GetTimeoutError", "RayActorError", "ActorDiedError", "TaskCancelledError",
             "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError"):
    setattr(_sys.modules["ray.exceptions"], _exc, type(_exc, (_sys.modules["ray.exceptions"].RayError,), {}))
_sys.modules["ray.runtime_context"].get_runtime_context = _unavailable
