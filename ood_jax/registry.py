"""A named registry: the one mechanism behind objectives, scores and datasets.

Each registry maps a name to an entry (an ``Objective``, a ``Score``, a
``DatasetSpec``) that carries its own ``name``. Names are unique unless a
registration says ``replace=True`` (re-running a notebook cell); looking up an
unknown name raises ``ValueError`` listing the registered ones and how to add one.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order.

    Args:
      kind: what the entries are, for messages (``"objective"``).
      how_to_add: the function users register with, for messages.
    """

    def __init__(self, kind: str, how_to_add: str) -> None:
        self.kind, self.how_to_add = kind, how_to_add
        self._entries: dict[str, T] = {}

    def add(self, entry: T, *, replace: bool = False) -> T:
        """Registers ``entry`` under ``entry.name``."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self._entries and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pick another name or pass "
                "replace=True."
            )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called ``name``."""
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}. "
                f"Register your own with {self.how_to_add}."
            )
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
