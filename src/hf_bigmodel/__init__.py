"""hf_bigmodel: big model inference for PyTorch and the Hugging Face ecosystem.

The public names mirror accelerate's big-model API (same arguments, same meaning), so switching is a
one-line import change::

    from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

The names live in :mod:`hf_bigmodel._api`, imported (with torch) on the first use of any of them:
``import hf_bigmodel`` alone loads nothing heavy, so ``hf-bigmodel --help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

if TYPE_CHECKING:
    from ._api import *  # noqa: F403
    from ._api import __all__ as __all__


def __getattr__(name: str) -> Any:
    """The public name ``name`` (importing the API once), or a subpackage the API import loaded."""
    if (name.startswith("__") and name != "__all__") or name == "_api":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _api = importlib.import_module(f"{__name__}._api")  # not "from . import": that asks __getattr__ first

    if name in _api.__all__ or name == "__all__":
        return getattr(_api, name)
    loaded = globals().get(name)  # e.g. hf_bigmodel.hf, which importing the API loaded
    if loaded is not None:
        return loaded
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    _api = importlib.import_module(f"{__name__}._api")

    return sorted({*globals(), *_api.__all__})
