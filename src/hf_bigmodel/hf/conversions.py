"""transformers' weight conversions, described for the core (:mod:`hf_bigmodel.load.conversions`).

transformers 5 registers, per model type, ``WeightRenaming`` s and ``WeightConverter`` s
(``conversion_mapping.get_model_conversion_mapping``; quantizers add theirs). :func:`plan_conversions`
runs them over the checkpoint's keys the way ``from_pretrained`` does (keys in transformers' natural
order, renames then at most one converter, ``base_model_prefix`` added or stripped) and returns:

- the plain renames (checkpoint key -> model name);
- one :class:`~hf_bigmodel.load.conversions.Conversion` per converted target: a *layout* when the
  converter's operations only move elements (``MergeModulelist``, ``Concatenate``, ``Chunk``, ``Split``),
  derived from the operations by :func:`_layout` and checked against transformers' own converter run
  on meta tensors; otherwise a computation that runs transformers' converter itself on the real tensors.

Nothing here is specific to a model: the converters come from transformers' registry.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, summarize
from ..load.conversions import Conversion, Part
from ..storage.checkpoint import TensorInfo
from ..storage.fused import Box, full_box

__all__ = ["TransformersKeys", "plan_conversions"]

logger = logging.getLogger(__name__)

#: ``(key, box in the value, box in the key's tensor, value dim -> key dim or None for a stacked dim)``
_Piece = tuple[str, Box, Box, tuple[int | None, ...]]


@dataclass
class _Value:
    """A tensor of ``shape`` made of pieces of checkpoint tensors (what a layout operation produces)."""

    shape: tuple[int, ...]
    pieces: list[_Piece]


@dataclass
class TransformersKeys:
    """What transformers' conversion mapping makes of a checkpoint's keys."""

    renames: dict[str, str] = field(default_factory=dict)
    conversions: list[Conversion] = field(default_factory=list)

    @property
    def converted(self) -> set[str]:
        return {key for conv in self.conversions for key in conv.sources}


def _source(key: str, shape: tuple[int, ...]) -> _Value:
    return _Value(shape, [(key, full_box(shape), full_box(shape), tuple(range(len(shape))))])


def _stack(values: Sequence[_Value], dim: int) -> _Value | None:
    if not values or any(v.shape != values[0].shape for v in values):
        return None
    dim %= len(values[0].shape) + 1
    shape = values[0].shape[:dim] + (len(values),) + values[0].shape[dim:]
    pieces = [(key, dst[:dim] + ((i, i + 1),) + dst[dim:], src, dims[:dim] + (None,) + dims[dim:])
              for i, v in enumerate(values) for key, dst, src, dims in v.pieces]
    return _Value(shape, pieces)


def _cat(values: Sequence[_Value], dim: int) -> _Value | None:
    if not values:
        return None
    rank = len(values[0].shape)
    dim %= rank
    outer = values[0].shape[:dim] + values[0].shape[dim + 1:]
    if any(len(v.shape) != rank or v.shape[:dim] + v.shape[dim + 1:] != outer for v in values):
        return None
    pieces: list[_Piece] = []
    offset = 0
    for v in values:
        for key, dst, src, dims in v.pieces:
            moved = dst[:dim] + ((dst[dim][0] + offset, dst[dim][1] + offset),) + dst[dim + 1:]
            pieces.append((key, moved, src, dims))
        offset += v.shape[dim]
    return _Value(values[0].shape[:dim] + (offset,) + values[0].shape[dim + 1:], pieces)


def _cut(value: _Value, dim: int, start: int, stop: int) -> _Value:
    """Elements ``start:stop`` of ``value`` along ``dim``."""
    pieces: list[_Piece] = []
    for key, dst, src, dims in value.pieces:
        low, high = max(dst[dim][0], start), min(dst[dim][1], stop)
        if low >= high:
            continue
        kept = dst[:dim] + ((low - start, high - start),) + dst[dim + 1:]
        source = dims[dim]
        if source is not None:
            first = src[source][0] + low - dst[dim][0]
            src = src[:source] + ((first, first + high - low),) + src[source + 1:]
        pieces.append((key, kept, src, dims))
    return _Value(value.shape[:dim] + (stop - start,) + value.shape[dim + 1:], pieces)


def _split(value: _Value, dim: int, sizes: Sequence[int]) -> list[_Value] | None:
    dim %= len(value.shape)
    if sum(sizes) != value.shape[dim]:
        return None
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [_cut(value, dim, a, b) for a, b in zip(bounds, bounds[1:])]


def _one(values: Mapping[str, Any]) -> _Value | None:
    if len(values) != 1:
        return None
    value = next(iter(values.values()))
    if isinstance(value, list):
        return value[0] if len(value) == 1 else None
    return value  # type: ignore[no-any-return]


def _apply(op: Any, values: dict[str, Any], sources: list[str], targets: list[str], full_name: str,
           model: nn.Module) -> dict[str, Any] | None:
    """One of transformers' layout operations on symbolic values, with its own key semantics; None: not one."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Split

    kind = type(op)
    if kind is MergeModulelist:
        if len(values) == 1 and len(targets) != 1:
            return None
        merged = {}
        for pattern, value in values.items():
            key = targets[0] if len(values) == 1 else pattern
            merged[key] = value if isinstance(value, _Value) else _stack(value, op.dim)
        return None if any(v is None for v in merged.values()) else merged
    if kind is Concatenate:
        if len(targets) != 1:
            return None
        parts: list[_Value] = []
        for pattern in sources:
            value = values.get(pattern)
            if value is not None:
                parts.extend(value if isinstance(value, list) else [value])
        joined = _cat(parts, op.dim)
        return None if joined is None else {targets[0]: joined}
    value = _one(values)
    if value is None:
        return None
    if kind is Chunk:
        names = op.get_target_patterns(targets, config=getattr(model, "config", None))
        length = value.shape[op.dim % len(value.shape)]
        size = -(-length // len(names)) if names else 0
        pieces = _split(value, op.dim, [min(size, length - a) for a in range(0, length, size)] if size else [])
        return None if pieces is None else dict(zip(names, pieces))
    if kind is Split:
        sizes = [model.get_parameter(full_name.replace(targets[0], t)).shape[op.dim] for t in targets]
        pieces = _split(value, op.dim, sizes)
        return None if pieces is None else dict(zip(targets, pieces))
    return None


def _full_names(results: Mapping[str, Any], layer_name: str) -> dict[str, Any]:
    """Target patterns -> full names, as ``WeightConverter.convert`` expands them."""
    full = layer_name.replace("*.", "0.") if "*." in layer_name else layer_name
    found = next((full.partition(k) for k in results if k in full), None)
    if found is None:
        return dict(results)
    prefix, _, suffix = found
    return {prefix + k + suffix: v for k, v in results.items()}


def _layout(converter: Any, keys: Mapping[str, list[str]], infos: Mapping[str, TensorInfo], first: str,
            model: nn.Module) -> dict[str, _Value] | None:
    """The converter's result as pieces of checkpoint tensors, or None when its operations are not all layout."""
    values: dict[str, Any] = {p: [_source(k, infos[k].shape) for k in ks] for p, ks in keys.items()}
    for op in converter.operations:
        try:
            step = _apply(op, values, converter.source_patterns, converter.target_patterns, first, model)
        except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        if step is None:
            return None
        values = step
    if any(not isinstance(v, _Value) for v in values.values()):
        return None
    return _full_names(values, first)


def _run(converter: Any, keys: Mapping[str, list[str]], tensors: Mapping[str, torch.Tensor], first: str,
         model: nn.Module, quantizer: Any) -> dict[str, torch.Tensor]:
    """transformers' own converter on ``tensors`` (a fresh copy of it: converters gather state).

    An operation that fails raises :class:`~hf_bigmodel.errors.CheckpointError` naming the tensors (where
    ``from_pretrained`` would log it and leave them randomly initialised).
    """
    from transformers.core_model_loading import SkipParameters

    quantize, converter.quantization_operation = converter.quantization_operation, None
    try:
        conv = copy.deepcopy(converter)  # the operations, not the quantizer they may point to
    finally:
        converter.quantization_operation = quantize
    conv.quantization_operation = quantize
    for pattern, names in keys.items():
        for key in names:
            conv.add_tensor(first, key, pattern, (lambda t=tensors[key]: t))
    # What transformers' operations record into while loading (quantize operations mark what they made).
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                           conversion_errors={}, skipped_pp_keys=set())
    try:
        out = conv.convert(first, model=model, config=getattr(model, "config", None), hf_quantizer=quantizer,
                           loading_info=info if quantizer is not None else None)
    except SkipParameters:
        why = "; ".join(str(e).strip().splitlines()[-1] for e in info.conversion_errors.values())
        raise CheckpointError(
            f"transformers' {_label(conv)} failed on {summarize(list(tensors))} for {first}: {why}. This is "
            "the operation from_pretrained runs while loading, and it fails there the same way: a kernel this "
            "machine lacks, or a checkpoint that does not fit the model. Nothing was loaded.",
        ) from None
    return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def _dry_run(converter: Any, keys: Mapping[str, list[str]], infos: Mapping[str, TensorInfo], first: str,
             model: nn.Module, dtypes: Mapping[str, torch.dtype | None]) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes the converter makes, from meta tensors (None when it cannot run on them)."""
    tensors = {k: torch.empty(infos[k].shape, dtype=dtypes.get(k) or infos[k].dtype, device="meta")
               for ks in keys.values() for k in ks}
    try:
        out = _run(converter, keys, tensors, first, model, None)
    except Exception as err:  # noqa: BLE001  (third-party operations fail on meta tensors in many ways)
        logger.debug("Cannot dry-run %r for %s on meta tensors: %s", converter, first, err)
        return None
    return {n: tuple(v.shape) for n, v in out.items() if isinstance(v, torch.Tensor)}


def _label(converter: Any) -> str:
    ops = ", ".join(repr(op) for op in getattr(converter, "operations", ()))
    quantize = getattr(converter, "quantization_operation", None)
    return f"{type(converter).__name__}({ops}{', ' if ops and quantize else ''}{repr(quantize) if quantize else ''})"


def _conversion(converter: Any, keys: dict[str, list[str]], infos: Mapping[str, TensorInfo], first: str,
                model: nn.Module, quantizer: Any, source_dtype: Callable[[str, str], torch.dtype | None]) -> Conversion:
    sources = tuple(k for ks in keys.values() for k in ks)
    label = f"{_label(converter)} into {first}"
    dtypes = {k: source_dtype(k, first) for k in sources}
    quantized = converter.quantization_operation is not None
    shapes = {} if quantized else _dry_run(converter, keys, infos, first, model, dtypes) or {}
    layout = None if quantized else _layout(converter, keys, infos, first, model)
    if layout is not None and shapes and {n: v.shape for n, v in layout.items()} == shapes:
        parts = tuple(Part(key, name, dst, src) for name, value in layout.items() for key, dst, src, _ in value.pieces)
        return Conversion(sources, tuple(layout), parts=parts, label=label)
    if layout is not None:
        logger.debug("Layout of %s disagrees with transformers' dry run; converting it in full", label)

    on_read = _dequantizes(converter, quantizer)
    # Run when a module reads its weights, it must not keep the model alive (the prefetcher's thread holds it).
    owner: Any = weakref.proxy(model) if on_read else model

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _run(converter, keys, tensors, first, owner, quantizer)

    targets = tuple(shapes) if shapes else (first,)
    return Conversion(sources, targets, convert=convert, source_dtypes=dtypes, shapes=shapes, label=label,
                      on_read=on_read)


def _dequantizes(converter: Any, quantizer: Any) -> bool:
    """Whether the converter dequantizes (a quantizer's load operation with ``dequantize`` set): a pure function
    of the checkpoint's quantized tensors, run each time a disk module reads them so they stay quantized."""
    if quantizer is None or not getattr(quantizer.quantization_config, "dequantize", False):
        return False
    return any(getattr(op, "hf_quantizer", None) is not None for op in getattr(converter, "operations", ()))


def conversion_targets(model: nn.Module) -> Callable[[str], str] | None:
    """``key -> the model tensor it is renamed or converted into``, from names alone (no shard read).

    ``None`` when this transformers has no conversion registry. The same rules as :func:`plan_conversions`.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model, None, None)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", "")

    def target(key: str) -> str:
        renamed, _ = rename_source_key(key, renamings, converters, prefix, names)
        if renamed not in names and key in names:
            renamed, _ = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=names)
        return str(renamed)

    return target


def plan_conversions(
    model: nn.Module,
    infos: Mapping[str, TensorInfo],
    *,
    quantizer: Any = None,
    source_dtype: Callable[[str, str], torch.dtype | None] | None = None,
) -> TransformersKeys:
    """Run transformers' conversion mapping for ``model`` over the checkpoint keys ``infos``.

    ``source_dtype(key, target)``: the dtype a converted source is cast to before its converter runs (as
    ``from_pretrained`` casts it; None keeps it). Returns the renames and the conversions.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model, None, quantizer)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", "")
    result = TransformersKeys()
    groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    for key in sorted(infos, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if renamed not in names and key in names:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=names)
        if pattern is not None and renamed in names:
            template, keys = groups.setdefault(renamed, (copy.deepcopy(by_pattern[pattern]), {}))
            keys.setdefault(pattern, []).append(key)
        elif renamed != key:
            result.renames[key] = renamed
    quantize = _quantize_on_load(model, quantizer)
    converted = {k for _, keys in groups.values() for ks in keys.values() for k in ks}
    for key in infos:  # a plain tensor quantized while loading: a renaming with transformers' quantize operation
        renamed = result.renames.get(key, key)
        if key not in converted and renamed in names and renamed not in groups and quantize(renamed):
            result.renames.pop(key, None)
            groups[renamed] = (WeightRenaming(key, renamed), {key: [key]})
    for first, (template, keys) in groups.items():
        if quantize(first):
            template.quantization_operation = quantizer.get_quantize_ops()
        pick = _source_dtypes(source_dtype, quantizer, template, infos)
        result.conversions.append(_conversion(template, keys, infos, first, model, quantizer, pick))
    return result


def _quantize_on_load(model: nn.Module, quantizer: Any) -> Callable[[str], bool]:
    """Whether a model tensor is quantized while loading (``quantization_config=`` on a plain checkpoint)."""
    if quantizer is None or quantizer.pre_quantized:
        return lambda name: False
    return lambda name: bool(quantizer.param_needs_quantization(model, name))


def _source_dtypes(source_dtype: Callable[[str, str], torch.dtype | None] | None, quantizer: Any, converter: Any,
                   infos: Mapping[str, TensorInfo]) -> Callable[[str, str], torch.dtype | None]:
    """What ``from_pretrained`` casts a converter's source to; a pre-quantized checkpoint's quantizer decides last."""
    def pick(key: str, target: str) -> torch.dtype | None:
        dtype = source_dtype(key, target) if source_dtype is not None else None
        if quantizer is not None and quantizer.pre_quantized:
            like = torch.empty(0, dtype=infos[key].dtype, device="meta")
            dtype = quantizer.get_new_dtype(converter, like, dtype)
        return dtype

    return pick
