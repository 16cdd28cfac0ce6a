"""String registry of methods: CLI name -> class (DESIGN.md)."""

from __future__ import annotations

from ..errors import UqloraError
from .base import Method
from .map import MapMethod, ZeroShotMethod

METHODS: dict[str, type[Method]] = {"map": MapMethod, "zero-shot": ZeroShotMethod}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UqloraError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def trainable_methods() -> list[str]:
    return sorted(n for n, cls in METHODS.items() if cls.trains)
