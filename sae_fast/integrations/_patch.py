"""The undoable patch every ``accelerate()`` returns.

A patch sets attributes on one object (never on its class, so other instances of the library's
classes are untouched) and remembers what was there; ``undo()`` puts it back. Parameters are
never replaced or copied: the patched methods read the library's own tensors (as views with
strides where the layouts differ), so its optimizer, state dict and checkpoints keep working.
"""

from __future__ import annotations

import types
from typing import Any

_MISSING = object()


class Acceleration:
    """Handle returned by ``accelerate``: ``undo()`` (or leaving a ``with`` block) restores
    the object. ``patched`` lists the attributes replaced; empty when the object's
    architecture is not accelerated (a warning says so)."""

    def __init__(self, obj: Any, library: str):
        self.obj = obj
        self.library = library
        self.patched: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, target: Any, name: str, value: Any) -> None:
        """Replace ``target.name`` by ``value`` until ``undo``; functions are bound to target."""
        if isinstance(value, types.FunctionType):
            value = types.MethodType(value, target)
        self._saved.append((target, name, target.__dict__.get(name, _MISSING)))
        object.__setattr__(target, name, value)
        self.patched.append(name if target is self.obj else f"{type(target).__name__}.{name}")

    def undo(self) -> None:
        for target, name, old in reversed(self._saved):
            if old is _MISSING:
                target.__dict__.pop(name, None)
            else:
                object.__setattr__(target, name, old)
        self._saved.clear()
        self.patched.clear()

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def __enter__(self) -> "Acceleration":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        what = ", ".join(self.patched) if self.patched else "nothing (not accelerated)"
        return f"Acceleration({self.library} {type(self.obj).__name__}: {what})"

