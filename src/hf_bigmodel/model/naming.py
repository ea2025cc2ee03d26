"""The one prefix matcher: which module entry of a device map (or any module-keyed table) owns a name."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TypeVar

__all__ = ["owner", "lookup", "is_within", "join", "parent"]

T = TypeVar("T")


def join(prefix: str, name: str) -> str:
    """``("a.b", "c")`` -> ``"a.b.c"``; ``("", "c")`` -> ``"c"``."""
    return f"{prefix}.{name}" if prefix else name


def parent(name: str) -> str:
    """``"a.b.c"`` -> ``"a.b"``; ``"a"`` -> ``""``."""
    cut = name.rfind(".")
    return name[:cut] if cut >= 0 else ""


def owner(name: str, prefixes: Collection[str]) -> str | None:
    """The longest entry of ``prefixes`` that is ``name`` or a dotted ancestor of it.

    ``""`` is the ancestor of everything. Cost is the depth of ``name``, not the size of ``prefixes``
    (pass a set or dict for that).

    >>> owner("model.layers.3.mlp.weight", {"model.layers.3", "model"})
    'model.layers.3'
    """
    while True:
        if name in prefixes:
            return name
        if not name:
            return None
        name = parent(name)


def lookup(name: str, table: Mapping[str, T]) -> T:
    """``table[owner(name, table)]``; ``KeyError`` naming ``name`` when nothing owns it."""
    key = owner(name, table)
    if key is None:
        raise KeyError(name)
    return table[key]


def is_within(name: str, prefix: str) -> bool:
    """True when ``name`` is ``prefix`` or lies inside it (``""`` contains everything)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")
