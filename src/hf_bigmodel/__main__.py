"""``python -m hf_bigmodel``: the ``hf-bigmodel`` command line (see :mod:`hf_bigmodel.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
