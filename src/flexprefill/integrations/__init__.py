"""Integrations with model libraries.  transformers: ``attn_implementation="flexprefill"``.

``import flexprefill`` registers the name with transformers without importing transformers
(about 4 s): if transformers is already imported it registers now, otherwise right after
``transformers.modeling_utils`` is first imported (a one-shot import hook).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["patch", "unpatch", "register", "last_record"]

_TRIGGER = "transformers.modeling_utils"


def _have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def register() -> None:
    """Register ``"flexprefill"`` as a transformers attention implementation (imports transformers)."""
    from . import transformers as _tf

    _tf.register()


def patch(model, config=None, **kwargs):
    """Switch a loaded transformers model to FlexPrefill; see :func:`flexprefill.integrations.transformers.patch`."""
    from . import transformers as _tf

    return _tf.patch(model, config, **kwargs)


def unpatch(model) -> bool:
    """Restore the model's previous attention; see :func:`flexprefill.integrations.transformers.unpatch`."""
    from . import transformers as _tf

    return _tf.unpatch(model)


def last_record(model, *, prefill: bool = False) -> dict:
    """Per attention layer, the path its last call took; see :func:`flexprefill.integrations.transformers.last_record`."""
    from . import transformers as _tf

    return _tf.last_record(model, prefill=prefill)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` once ``transformers.modeling_utils`` has executed, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _remove_hook()
            # when our transformers module itself triggered this import it registers at its end
            if __name__ + ".transformers" not in sys.modules:
                register()

        loader.exec_module = exec_module
        return spec


_HOOK = _RegisterAfterImport()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def _install() -> None:
    if not _have_transformers():
        return
    if _TRIGGER in sys.modules:
        register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


_install()
