"""A registry of model parts by name (as timm's register_model and papermill's engines): a part
registers itself once, in its own module; everything else builds it by name, and an unknown
name is one ConfigError listing what exists."""

from __future__ import annotations

from pneumo.errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._parts: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: the class's `name` is its registered name."""
        if cls.name in self._parts:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
        self._parts[cls.name] = cls
        return cls

    def get(self, name: str) -> type:
        try:
            return self._parts[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts
