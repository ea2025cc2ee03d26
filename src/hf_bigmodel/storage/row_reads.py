"""Reading some rows of a tensor from its file, and nothing else (an embedding's batch of token ids).

Consecutive rows are read together, each run of them with one aligned :class:`~.direct_io.DirectReader`
read, so an offloaded embedding costs a forward the bytes of its batch's rows, not the whole matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .direct_io import DirectReader, aligned_empty, padded_span
from .safetensors_io import TensorEntry

__all__ = ["read_rows", "row_runs"]


def row_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """``rows`` (sorted, distinct) as half-open runs of consecutive indices.

    >>> row_runs([0, 1, 2, 7, 9, 10])
    [(0, 3), (7, 8), (9, 11)]
    """
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def read_rows(entry: TensorEntry, rows: Sequence[int], reader: DirectReader) -> torch.Tensor:
    """Rows ``rows`` (sorted, distinct indices along dim 0) of the tensor ``entry``, read from its file alone.

    Consecutive rows are read together, each run with one aligned read; nothing else of the tensor is
    read. Returns a fresh ``(len(rows), *entry.shape[1:])`` tensor of ``entry.dtype``.

    Example::

        reader = DirectReader()
        embeddings = read_rows(header.entries["model.embed_tokens.weight"], [1, 17, 4095], reader)
    """
    if not entry.shape:
        raise ValueError(f"{entry.key!r} is a scalar; it has no rows to read")
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    out = torch.empty((len(rows), *entry.shape[1:]), dtype=entry.dtype)
    if not rows or row_bytes == 0:
        return out
    flat = out.view(-1).view(torch.uint8)
    runs = row_runs(rows)
    pieces = [replace(entry, key=f"{entry.key}[{a}:{b}]", shape=(b - a, *entry.shape[1:]),
                      start=entry.start + a * row_bytes, end=entry.start + b * row_bytes) for a, b in runs]
    if runs[0][0] < 0 or runs[-1][1] > entry.shape[0]:
        raise IndexError(f"rows {runs[0][0]}..{runs[-1][1] - 1} of {entry.key!r} asked; it has {entry.shape[0]}")
    buffer = aligned_empty(max(padded_span(p)[1] for p in pieces))
    at = 0
    for piece in pieces:
        raw = reader.read_into(piece, buffer)
        flat[at : at + piece.nbytes].copy_(raw)
        at += piece.nbytes
    return out
