"""Embeddings read by row: an embedding offloaded to disk reads only the rows of the tokens it is given.

A forward at batch 1 looks up one row (a decode step) or a few dozen (a prompt) of a matrix that holds
the whole vocabulary: 131 MB for a 32k-vocabulary model of width 2048 in bf16, 1 GiB for a 128k one of
width 4096. :class:`EmbeddingRowsHook` replaces the offloading hook of such an embedding: before the
module runs it reads the distinct rows its input asks for (consecutive ones in one read, around the page
cache like every offloaded read), puts that small matrix in the weight's slot, and hands the module the
positions of each token in it. ``nn.Embedding``'s forward is a gather, so the output is the very same
tensor the whole matrix gives.

It applies only where that holds: a plain ``nn.Embedding`` forward (not overridden by a subclass), no
``max_norm`` (which renormalises rows of the weight in place), gradients off (generation), and the
weight on disk. When many rows are asked for (a long prompt, a large batch) one sequential read of the
whole matrix is cheaper than many small ones, and the matrix is read whole, as any offloaded weight.

A tied output head (``lm_head.weight`` sharing the embedding's tensor) multiplies by the whole matrix at
every forward, so that module still reads all of it; only the embedding's own read shrinks.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..model.reads import row_readable
from ..storage.direct_io import DirectReader, padded_span
from ..storage.row_reads import read_rows, row_runs
from ..storage.weights_map import DiskTensor, WeightsMap
from .hooks import AlignDevicesHook, send_to_device

__all__ = ["EmbeddingRowsHook", "reads_by_row"]

logger = logging.getLogger(__name__)

#: Rows are read one run at a time; past this many runs, or past this share of the matrix's bytes, the
#: whole matrix is read in one sequential pass instead.
MAX_RUNS = 256
MAX_SHARE = 1 / 8


def reads_by_row(module: nn.Module, names: list[str], weights: WeightsMap) -> bool:
    """True when ``module``, offloaded with the tensors ``names`` (full names) from ``weights``, can read its
    weight by row and give exactly what the whole matrix gives."""
    # A plain byte range of one file (a tensor fused from pieces is read whole).
    return row_readable(module, names) and weights.is_on_disk(names[0]) and type(weights.disk[names[0]]) is DiskTensor


class EmbeddingRowsHook(AlignDevicesHook):
    """The offloading hook of an embedding whose weight is on disk: reads the rows its input asks for.

    Build it with the arguments of the :class:`AlignDevicesHook` it replaces; :func:`reads_by_row` says
    whether it applies. ``rows_read`` and ``whole_reads`` count what its forwards read.

    Example::

        hook = EmbeddingRowsHook("cpu", offload=True, weights_map=weights, prefix="model.embed_tokens",
                                 tensor_names=["weight"])
        add_hook_to_module(model.model.embed_tokens, hook)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reader = DirectReader()
        self.rows_read = 0
        self.whole_reads = 0
        self._padding: list[int | None] = []

    def _ref(self) -> DiskTensor:
        assert isinstance(self.weights_map, WeightsMap)
        ref = self.weights_map.disk[self.slots[0].name]
        assert isinstance(ref, DiskTensor)  # reads_by_row chose this hook for a plain byte range
        return ref

    def _rows_worth_reading(self, rows: list[int], ref: DiskTensor) -> bool:
        runs = row_runs(rows)
        if len(runs) > MAX_RUNS:
            return False
        row_bytes = ref.entry.nbytes // max(ref.shape[0], 1)
        start = ref.entry.start
        spans = sum(padded_span(replace(ref.entry, start=start + a * row_bytes, end=start + b * row_bytes))[1]
                    for a, b in runs)  # the aligned bytes each run's read fetches
        return spans <= ref.entry.nbytes * MAX_SHARE

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        ids = args[0] if args else kwargs.get("input")
        if torch.is_grad_enabled() or not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            return super().pre_forward(module, *args, **kwargs)
        ref = self._ref()
        unique, inverse = torch.unique(ids.detach().cpu(), sorted=True, return_inverse=True)
        rows = unique.tolist()
        if not self._rows_worth_reading(rows, ref):
            self.whole_reads += 1
            return super().pre_forward(module, *args, **kwargs)
        value = read_rows(ref.entry, rows, self.reader)  # an id outside the vocabulary is an IndexError here
        if value.dtype != ref.dtype:
            value = value.to(ref.dtype)
        device = self.execution_device or ids.device
        if self.io_same_device:
            self.input_device = ids.device
        self.slots[0].set(value.to(device))
        self._resident = True
        self.rows_read += len(rows)
        # padding_idx only shapes gradients, but F.embedding checks it against the (now short) weight.
        embedding = module
        assert isinstance(embedding, nn.Embedding)
        self._padding.append(embedding.padding_idx)
        embedding.padding_idx = None
        positions = inverse.to(device)
        if args:
            args = (positions, *args[1:])
        else:
            kwargs = {**kwargs, "input": positions}
        return args, send_to_device(kwargs, device, skip_keys=self.skip_keys)

    def _restore(self, module: nn.Module) -> None:
        if self._padding:
            assert isinstance(module, nn.Embedding)
            module.padding_idx = self._padding.pop()

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self._restore(module)
        return super().post_forward(module, output)

    def on_error(self, module: nn.Module) -> None:
        self._restore(module)
        super().on_error(module)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        self.reader.close()
        return super().detach_hook(module)
