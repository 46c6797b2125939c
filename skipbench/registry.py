"""A registry is a dict and a decorator; an unknown name lists the known ones."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from skipbench.errors import SkipbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries))
            raise SkipbenchError(f"unknown {self.kind} '{name}'; known: {known}")
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)
