"""The one reader of environment settings: on/off flags, whole numbers and raw text.

Read at call time, never at import, so a setting changed between two loads takes effect. A value of
ours (``HF_BIGMODEL_*``) that means nothing raises ``ValueError`` naming the variable and what it
accepts: a typo such as ``HF_BIGMODEL_DIRECT_IO=flase`` must not silently mean "on". Variables owned by
other libraries (``HF_HUB_*``) are read their owner's way (``strict=False``: anything else is off).

>>> import os
>>> os.environ["HF_BIGMODEL_DOCTEST_FLAG"] = "Off"
>>> flag("HF_BIGMODEL_DOCTEST_FLAG", default=True)
False
>>> del os.environ["HF_BIGMODEL_DOCTEST_FLAG"]
"""

from __future__ import annotations

import os

__all__ = ["flag", "whole_number", "text"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def text(name: str) -> str | None:
    """The variable's value with surrounding spaces removed; ``None`` when unset or blank."""
    raw = os.environ.get(name, "").strip()
    return raw or None


def flag(name: str, *, default: bool, strict: bool = True) -> bool:
    """An on/off setting: ``1/true/yes/on`` or ``0/false/no/off`` (any case); ``default`` when unset.

    With ``strict`` anything else raises ``ValueError``; without, anything but an "on" word is off.
    """
    raw = text(name)
    if raw is None:
        return default
    value = raw.lower()
    if value in _ON:
        return True
    if value in _OFF or not strict:
        return False
    raise ValueError(f"{name}={raw!r} is neither on ({', '.join(_ON)}) nor off ({', '.join(_OFF)}); "
                     f"set one of those or unset it.")


def whole_number(name: str, *, minimum: int = 0) -> int | None:
    """A whole number >= ``minimum``; ``None`` when unset. Anything else raises ``ValueError`` naming it."""
    raw = text(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={raw!r} is not a whole number >= {minimum}; set it to one (e.g. {minimum}) "
                         "or unset it.")
    return value
