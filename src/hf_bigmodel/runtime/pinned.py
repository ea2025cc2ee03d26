"""Page-locked RAM for weights streamed from RAM to a GPU: one exactly sized arena per device-map block.

torch's pinned allocator rounds every allocation up to a power of two: a 7B-shaped layer's 86 MiB MLP
matrices each take 128 MiB of page-locked RAM (about +33% over a layer, all of it outside any memory
budget). :func:`pin_blocks` copies each block's tensors (a decoder layer's, in model order) into one
page-aligned host buffer of exactly their size, page-locks it with ``cudaHostRegister``, and replaces
them by views into it. A group of tensors that lie next to each other in an arena then crosses the link
in one copy (:func:`spans`), not one per tensor.

The arenas stay page-locked while the weights map that holds them lives; its finalizer unregisters them
(the memory itself belongs to the tensors and goes when the last view goes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import OffloadError
from ..model.sizes import format_size
from ..storage.direct_io import aligned_empty
from ..storage.weights_map import WeightsMap

__all__ = ["ARENA_ALIGNMENT", "Span", "arena_layout", "pin_blocks", "spans"]

#: Tensors start at multiples of this inside an arena (and of a device buffer): any dtype's alignment.
ARENA_ALIGNMENT = 512

Register = Callable[[torch.Tensor], None]


def arena_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of tensors of ``sizes`` bytes laid out back to back at ARENA_ALIGNMENT, and the total.

    >>> arena_layout([1000, 24, 512])
    ([0, 1024, 1536], 2048)
    """
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
    return offsets, total


def _cuda_register(arena: torch.Tensor) -> None:
    code = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
    if int(code) != 0:
        raise OffloadError(f"Page-locking {format_size(arena.numel())} of RAM for offloaded weights failed "
                           f"(cudaHostRegister error {int(code)}); lower max_memory['cpu'] or raise the locked-memory "
                           "limit (ulimit -l).")


def _cuda_unregister(arenas: list[torch.Tensor]) -> None:
    for arena in arenas:
        torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())


def pin_blocks(weights: WeightsMap, blocks: Mapping[str, Sequence[str]], *, register: Register | None = None,
               unregister: Callable[[list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
    """Move the RAM tensors named in ``blocks`` (block -> full names, model order) into one arena per block.

    Names sharing a tensor (tied weights) share its one place. Tensors already pinned, or not contiguous,
    are left as they are. Returns the arenas (``uint8``); ``register`` page-locks one (default:
    ``cudaHostRegister``), ``unregister`` undoes it when ``weights`` is collected.
    """
    register = register or _cuda_register
    arenas: list[torch.Tensor] = []  # registered ones, unregistered with ``weights`` (even if a later one fails)
    finalizer = weakref.finalize(weights, unregister or _cuda_unregister, arenas)
    for names in blocks.values():
        distinct: dict[int, torch.Tensor] = {}
        for name in names:
            tensor = weights.memory.get(name)
            if tensor is not None and not tensor.is_pinned() and tensor.is_contiguous() and tensor.device.type == "cpu":
                distinct.setdefault(id(tensor), tensor)
        if not distinct:
            continue
        tensors = list(distinct.values())
        offsets, total = arena_layout([t.nbytes for t in tensors])
        arena = aligned_empty(total)
        register(arena)
        arenas.append(arena)  # the finalizer's list
        moved: dict[int, torch.Tensor] = {}
        for tensor, offset in zip(tensors, offsets):
            view = arena[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            moved[id(tensor)] = view.copy_(tensor)
        for name in names:
            tensor = weights.memory.get(name)
            if tensor is not None and id(tensor) in moved:
                weights.memory[name] = moved[id(tensor)]
    if not arenas:
        finalizer.detach()
    return list(arenas)


@dataclass
class Span:
    """A byte range of one host storage holding several tensors, copied in one go; ``members``: (index, offset)."""

    source: torch.Tensor  # uint8, the bytes to copy
    members: list[tuple[int, int]]


def spans(tensors: Iterable[torch.Tensor]) -> list[Span]:
    """Group contiguous host ``tensors`` into runs of nearby bytes of one storage, one copy each.

    Tensors of one arena that follow each other (gaps under ARENA_ALIGNMENT, every member at a multiple
    of it from the span's start) form one span; any other tensor is a span of its own. A member's offset
    is where its bytes start inside the span.

    >>> arena = torch.zeros(2048, dtype=torch.uint8)
    >>> a, b, c = arena[0:1000], arena[1024:1048], arena[1536:2048]
    >>> [s.members for s in spans([c, a, b])]
    [[(1, 0), (2, 1024), (0, 1536)]]
    """
    located = []
    for index, tensor in enumerate(tensors):
        start = int(tensor.storage_offset()) * tensor.element_size()
        located.append((tensor.untyped_storage().data_ptr(), start, start + int(tensor.nbytes), index, tensor))
    located.sort(key=lambda x: (x[0], x[1]))
    out: list[Span] = []
    run: list[tuple[int, int, int, int, torch.Tensor]] = []

    def close() -> None:
        if run:
            first, end = run[0][1], max(r[2] for r in run)
            whole = torch.empty(0, dtype=torch.uint8).set_(run[0][4].untyped_storage())
            out.append(Span(whole[first:end], [(r[3], r[1] - run[0][1]) for r in run]))
            run.clear()

    for entry in located:
        if run:
            end = max(r[2] for r in run)
            if (entry[0] != run[0][0] or entry[1] < end or entry[1] - end >= ARENA_ALIGNMENT
                    or (entry[1] - run[0][1]) % ARENA_ALIGNMENT):
                close()
        run.append(entry)
    close()
    return out
