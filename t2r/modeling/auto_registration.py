"""model_type "t2r" made known to transformers' Auto classes without importing transformers.

`import t2r` must stay light (the command line's `--help` in well under a second; transformers'
model classes alone take seconds to import). So `install()`, which `import t2r` calls, imports
nothing: it watches for transformers' own auto modules and registers when they load:

- when `transformers.models.auto.configuration_auto` has loaded, `T2RPretrainedConfig`
  (t2r.modeling.transformers_config: transformers' configuration code only) joins `AutoConfig`;
- when `transformers.models.auto.modeling_auto` has loaded, a stand-in for `T2RModelForCausalLM`
  joins `AutoModelForCausalLM`: the stand-in imports the real class at its first use (by then
  nothing is half-imported) and the real class's module registers itself in its place.

Either module already loaded when `install()` runs is registered at once. So, as before,

    import t2r
    model = AutoModelForCausalLM.from_pretrained(folder)

loads a converted folder, and a folder loads without `import t2r` through its `auto_map`
(`trust_remote_code=True`). A registration that fails is logged, never raised into someone
else's import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
MODEL_CLASS = "T2RModelForCausalLM"


def register_config(configuration_auto: ModuleType) -> None:
    from t2r.modeling.transformers_config import T2RPretrainedConfig

    configuration_auto.CONFIG_MAPPING.register(T2RPretrainedConfig.model_type, T2RPretrainedConfig, exist_ok=True)


def register_model(modeling_auto: ModuleType) -> None:
    from t2r.modeling.transformers_config import T2RPretrainedConfig

    mapping = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    if not isinstance(mapping.get(T2RPretrainedConfig, None), type):  # the real class may be there already
        mapping.register(T2RPretrainedConfig, LazyModelClass(), exist_ok=True)


class LazyModelClass:
    """Stands in for T2RModelForCausalLM in AutoModelForCausalLM's mapping: every attribute
    (`from_pretrained`, `from_config`, `config_class`, ...) is the real class's, imported on first use."""

    __name__ = MODEL_CLASS
    __qualname__ = MODEL_CLASS

    def __getattr__(self, name: str) -> Any:
        from t2r.modeling import transformers_model

        return getattr(transformers_model.T2RModelForCausalLM, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from t2r.modeling.transformers_model import T2RModelForCausalLM

        return T2RModelForCausalLM(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<class 't2r.modeling.transformers_model.{MODEL_CLASS}' (loaded on first use)>"


HOOKS: dict[str, Callable[[ModuleType], None]] = {CONFIG_AUTO: register_config, MODELING_AUTO: register_model}


def run_hook(name: str, module: ModuleType) -> None:
    try:
        HOOKS[name](module)
    except Exception as error:  # another library's import must not fail because of t2r
        log.warning("model type 't2r' not registered with %s (%s)", name, error)


class _RegisterAfter(importlib.abc.Loader):
    """The loader transformers' module would have had, plus the registration after it runs."""

    def __init__(self, name: str, loader: importlib.abc.Loader) -> None:
        self._name, self._loader = name, loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # sources, resources: the original loader's
        self._loader.exec_module(module)
        run_hook(self._name, module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the watched names, wraps the loader the other finders return."""

    def find_spec(
        self, name: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfter(name, spec.loader)
                return spec
        return None


def install() -> None:
    """Register now where transformers' auto modules are loaded, and when they load otherwise."""
    if not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
    for name in HOOKS:
        module = sys.modules.get(name)
        if module is not None:
            run_hook(name, module)
