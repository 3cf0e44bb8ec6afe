"""One registry type for explanation methods and for rules: a name, a function, a description.

Registering is a decorator on a plain function, so a new method or rule is one file.
Duplicate names are refused; an unknown name suggests the closest registered one.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    description: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class UnknownName(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want the sentence
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        """Decorator: ``@METHODS.register("saliency", needs_layer=False)``.

        The description is the first line of the function's docstring.
        """

        def decorate(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._entries[name].fn.__module__} and {fn.__module__})")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, doc[0] if doc else "", dict(meta))
            return fn

        return decorate

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownName(f"unknown {self.kind} {name!r}{hint} "
                              f"(registered: {', '.join(sorted(self._entries))})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


METHODS = Registry("explanation method")
RULES = Registry("rule")
