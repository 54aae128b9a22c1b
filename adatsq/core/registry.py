"""Decorator + dict registries: quantization methods, model adapters, token reducers, plan searches and CLI
commands all register alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from adatsq.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to an implementation; `get` names the allowed values when a lookup fails."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; supported: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
