"""Drop-in acceleration of other libraries' SAE objects, in place.

``sae_fast.accelerate(obj)`` dispatches on the object's library (by the modules its class and
its bases come from, so none of these libraries is imported unless the object is one of theirs):

* SAELens (``sae_lens``): ``integrations.saelens.accelerate``
* EleutherAI sparsify (``sparsify``): ``integrations.sparsify.accelerate``
* dictionary_learning (``dictionary_learning``): ``integrations.dictionary_learning.accelerate``

Each returns an ``Acceleration`` handle: ``undo()`` (or a ``with`` block) restores the object.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._patch import Acceleration

_LIBRARIES = {"sae_lens": "saelens", "sparsify": "sparsify", "dictionary_learning": "dictionary_learning"}


def accelerate(obj: Any, **kwargs) -> Acceleration:
    """Route ``obj``'s encode / decode / forward (and its training forward pass where the
    library has one) through the sae_fast ops, keeping its API; see the library modules."""
    # the first class in the MRO from a supported library: a user's subclass of theirs counts
    # (whether its overrides can be accelerated is the library module's call)
    roots = [c.__module__.split(".")[0] for c in type(obj).__mro__]
    root = next((r for r in roots if r in _LIBRARIES), None)
    if root is None:
        raise TypeError(f"sae_fast.accelerate: {type(obj).__module__}.{type(obj).__qualname__} is not an SAE "
                        f"of a supported library ({', '.join(_LIBRARIES)})")
    module = importlib.import_module(f"{__name__}.{_LIBRARIES[root]}")
    return module.accelerate(obj, **kwargs)


__all__ = ["accelerate", "Acceleration"]
