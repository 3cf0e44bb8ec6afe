"""One registry type for explanation methods and for rules: a function and its own words.

Registering is a decorator on a plain function, so a new method or rule is one file. Each entry
carries what the report and the coverage record need, so no other module names a rule or a
method: ``title`` (a plain-language name), ``glossary`` (one sentence for the report's
glossary), ``needs`` (what must be there for it to apply: "heatmaps", "masks", "model",
"layer"), and for rules ``effects`` (details -> short phrases of its effect sizes).

Parameters are validated before any work from the function's signature: its type hints (with
``Annotated[..., Field(...)]`` for ranges) become a pydantic model. Duplicate names are refused;
an unknown name suggests the closest registered one.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

NEEDS = ("heatmaps", "masks", "model", "layer")


class UnknownName(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want the sentence
        return str(self.args[0])


class BadParams(ValueError):
    """A parameter of the wrong type or out of range: ``key`` (dotted under the entry) and why."""

    def __init__(self, key: str, why: str):
        super().__init__(f"'{key}': {why}")
        self.key, self.why = key, why


@dataclass(frozen=True, eq=False)
class Entry:
    name: str
    fn: Callable[..., Any]
    description: str
    title: str
    glossary: str
    needs: tuple[str, ...] = ()
    effects: Callable[[dict], list[str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skip: int = 0                      # leading positional parameters the caller supplies
    supplied: tuple[str, ...] = ()     # keyword parameters the run supplies (never configured)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @cached_property
    def params(self) -> type[BaseModel]:
        """A pydantic model of the configurable parameters, from the signature's type hints."""
        sig = inspect.signature(self.fn)
        hints = typing.get_type_hints(self.fn, include_extras=True)
        fields = {}
        for p in list(sig.parameters.values())[self.skip:]:
            if p.name in self.supplied or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (hints.get(p.name, Any), default)
        return create_model(f"{self.name}_params", __config__=ConfigDict(extra="forbid", strict=False), **fields)

    def validate(self, params: dict) -> dict:
        """``params`` checked and coerced; BadParams names the first wrong key."""
        try:
            got = self.params.model_validate(params)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"] if p != "[key]")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(self.params.model_fields) or "none"
                raise BadParams(key, f"unknown parameter; allowed: {allowed}") from None
            expected = self.params.model_fields.get(str(err["loc"][0]))
            what = _type_name(expected.annotation) if expected else ""
            raise BadParams(key, f"{err['msg']}" + (f" (expected {what})" if what else "")) from None
        return {k: getattr(got, k) for k in params}


def _type_name(annotation: Any) -> str:
    """'float', 'int': the expected type, where it is a plain one (pydantic's message says the rest)."""
    name = getattr(annotation, "__name__", None)
    return name if name and not typing.get_args(annotation) else ""


class Registry:
    def __init__(self, kind: str, skip: int, supplied: tuple[str, ...] = ()):
        self.kind, self.skip, self.supplied = kind, skip, supplied
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, title: str, glossary: str, needs: tuple[str, ...] = (),
                 effects: Callable[[dict], list[str]] | None = None, **meta: Any) -> Callable[[Callable], Callable]:
        """Decorator: ``@RULES.register("corner_border", title=..., glossary=..., needs=("heatmaps",))``.

        The description is the first line of the function's docstring."""
        unknown = [n for n in needs if n not in NEEDS]
        if unknown or not title.strip() or not glossary.strip():
            raise ValueError(f"{self.kind} {name!r}: needs a title and a glossary sentence, and needs from "
                             f"{NEEDS} (got {unknown or needs})")

        def decorate(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._entries[name].fn.__module__} and {fn.__module__})")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, doc[0] if doc else "", title, glossary, tuple(needs), effects,
                                        dict(meta), self.skip, self.supplied)
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


METHODS = Registry("explanation method", skip=3, supplied=("layer",))
RULES = Registry("rule", skip=1)
