"""Cutting a model into pipeline stages, one per process: pure, from sizes and each process's budgets.

A decoder-style model is a run of repeated blocks (the *spine*, e.g. ``model.layers``) with a few modules
before it (embeddings) and after it (final norm, head). Stages are contiguous runs of blocks, cut only
between blocks: the first stage also holds what comes before the spine, the last what comes after.
Modules without parameters (rotary embeddings, dropout) and tensors held directly by the modules around
the spine are *shared*: every stage holds them. Cuts balance each stage's bytes against its process's
fast memory (its accelerators' budget, else its RAM budget), minimising the largest ratio.

Like the device-map planner this reads shapes and dtypes only (meta models are fine) and touches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import PipelineError
from ..model.naming import is_within, join
from ..model.sizes import compute_module_sizes, format_size
from ..plan.device_map import resolve_device_map
from ..plan.devices import Device, is_offload_target
from ..plan.placement import Placement
from ..runtime.prefetch_plan import prefetch_headroom
from .view import stage_only

__all__ = ["StagePlan", "Unit", "fast_capacity", "plan_stages", "stage_device_map"]

UnitKind = Literal["first", "block", "last", "shared"]


@dataclass(frozen=True)
class Unit:
    """A module (or a tensor held directly by a module around the spine) that moves to a stage whole."""

    name: str
    kind: UnitKind  # "first"/"last": with the first/last stage; "block": a spine block; "shared": everywhere
    size: int


@dataclass(frozen=True)
class StagePlan:
    """Which stage holds which unit; ``starts[s]`` is the index in ``blocks`` of stage ``s``'s first block.

    Example::

        plan = plan_stages(model, num_stages=2, no_split_module_classes=["LlamaDecoderLayer"])
        plan.held_by(1)   # ['model.layers.16', ..., 'model.norm', 'lm_head', 'model.rotary_emb']
        print(plan.describe())
    """

    spine: str
    units: tuple[Unit, ...]
    starts: tuple[int, ...]
    #: Each process's fast memory in bytes (``()`` when planned for equal processes without budgets).
    capacities: tuple[int, ...] = ()

    @property
    def num_stages(self) -> int:
        return len(self.starts)

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.kind == "block")

    def block_range(self, stage: int) -> tuple[int, int]:
        """``(start, stop)`` indices in :attr:`blocks` of the blocks stage ``stage`` runs."""
        stop = self.starts[stage + 1] if stage + 1 < self.num_stages else len(self.blocks)
        return self.starts[stage], stop

    def stage_of(self, unit: str) -> int | None:
        """The stage holding ``unit`` (``None``: shared by every stage)."""
        found = next((u for u in self.units if u.name == unit), None)
        if found is None:
            raise KeyError(unit)
        if found.kind == "shared":
            return None
        if found.kind == "first":
            return 0
        if found.kind == "last":
            return self.num_stages - 1
        index = self.blocks.index(unit)
        return max(s for s in range(self.num_stages) if self.starts[s] <= index)

    def held_by(self, stage: int) -> list[str]:
        """The units stage ``stage`` holds, shared ones included, in model order."""
        return [u.name for u in self.units if self.stage_of(u.name) in (stage, None)]

    def not_held_by(self, stage: int) -> list[str]:
        return [u.name for u in self.units if self.stage_of(u.name) not in (stage, None)]

    def bytes_of(self, stage: int) -> int:
        return sum(u.size for u in self.units if self.stage_of(u.name) == stage)

    def entry(self, stage: int) -> str | None:
        """The block whose input stage ``stage`` receives from the stage before (``None`` for the first)."""
        return self.blocks[self.starts[stage]] if stage > 0 else None

    def exit(self, stage: int) -> str | None:
        """The block whose input stage ``stage`` sends to the stage after (``None`` for the last)."""
        return self.entry(stage + 1) if stage + 1 < self.num_stages else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what ``hf-bigmodel plan --stages N --json`` prints)."""
        stages = []
        for s in range(self.num_stages):
            start, stop = self.block_range(s)
            stages.append({"stage": s, "blocks": [start, stop], "bytes": self.bytes_of(s),
                           "capacity": self.capacities[s] if self.capacities else None,
                           "units": [n for n in self.held_by(s) if self.stage_of(n) == s]})
        return {"spine": self.spine, "stages": stages,
                "shared": [u.name for u in self.units if u.kind == "shared"]}

    def describe(self) -> str:
        """One line per stage: its units (block runs collapsed), bytes, and the process's fast memory."""
        lines = []
        for s in range(self.num_stages):
            own = [n for n in self.held_by(s) if self.stage_of(n) == s]
            line = f"stage {s}: {_collapse(own, self.spine)}  {format_size(self.bytes_of(s))}"
            if self.capacities:
                line += f" of {format_size(self.capacities[s])} fast memory"
            lines.append(line)
        shared = [u.name for u in self.units if u.kind == "shared"]
        if shared:
            lines.append(f"every stage: {', '.join(shared)}")
        return "\n".join(lines)


def _collapse(names: Sequence[str], spine: str) -> str:
    """``model.layers.0, model.layers.1, model.layers.2`` -> ``model.layers.0-2``."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(join(spine, str(run[0])) + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for name in names:
        tail = name[len(spine) + 1:] if spine and name.startswith(spine + ".") else name
        if is_within(name, spine) and tail.isdigit() and (not run or int(tail) == run[-1] + 1):
            run.append(int(tail))
            continue
        flush()
        if is_within(name, spine) and tail.isdigit():
            run.append(int(tail))
        else:
            out.append(name)
    flush()
    return ", ".join(out)


def fast_capacity(budgets: Mapping[Device, int]) -> int:
    """Bytes a process can run from without streaming: its accelerators' budgets, else its RAM budget."""
    accelerators = sum(v for d, v in budgets.items() if not is_offload_target(d))
    return accelerators if accelerators > 0 else int(budgets.get("cpu", 0))


def _find_spine(model: nn.Module, no_split: set[str], sizes: Mapping[str, int]) -> str:
    """The largest run of repeated blocks: a ModuleList/Sequential of no-split blocks (else of one class)."""
    best: tuple[int, int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [m for m in module._modules.values() if m is not None]
        if len(children) < 2:
            continue
        classes = {type(m).__name__ for m in children}
        rank = 2 if classes <= no_split else 1 if len(classes) == 1 and not no_split & classes else 0
        if rank and (best is None or (rank, sizes.get(name, 0)) > best[:2]):
            best = (rank, sizes.get(name, 0), name)
    if best is None:
        raise PipelineError(
            f"{type(model).__name__} has no run of repeated blocks (a ModuleList of its no-split modules, e.g. "
            "decoder layers) to cut into pipeline stages; pipeline=True needs one. Load it on one process."
        )
    return best[2]


def _units(model: nn.Module, spine: str, sizes: Mapping[str, int]) -> list[Unit]:
    """Every unit in model order: first ones, the spine's blocks, then the last and shared ones."""
    found: list[Unit] = []
    path = [""] + [".".join(spine.split(".")[: i + 1]) for i in range(spine.count("."))]
    for holder_name in path:
        holder = model.get_submodule(holder_name)
        for key, tensor in [*holder._parameters.items(), *holder._buffers.items()]:
            if tensor is not None:
                found.append(Unit(join(holder_name, key), "shared", sizes.get(join(holder_name, key), 0)))
        seen_spine = False
        for key, child in holder._modules.items():
            name = join(holder_name, key)
            if child is None or is_within(spine, name):
                seen_spine = seen_spine or child is not None
                continue
            has_params = any(True for _ in child.parameters())
            kind: UnitKind = "shared" if not has_params else "last" if seen_spine else "first"
            found.append(Unit(name, kind, sizes.get(name, 0)))
    spine_module = model.get_submodule(spine)
    blocks = [Unit(join(spine, k), "block", sizes.get(join(spine, k), 0))
              for k, m in spine_module._modules.items() if m is not None]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def position(unit: Unit) -> int:
        return order.get(unit.name, order.get(unit.name.rpartition(".")[0], -1))

    found.sort(key=position)
    return [u for u in found if u.kind == "first"] + blocks + [u for u in found if u.kind != "first"]


def _unit_sizes(model: nn.Module, units: Sequence[Unit], dtype: str | torch.dtype | None,
                special: Mapping[str, str | torch.dtype], tensor_sizes: Mapping[str, int]) -> list[Unit]:
    """Units with their own bytes: a tied tensor counts in every unit holding it (each stage keeps a copy)."""
    sized = []
    for unit in units:
        try:
            module = model.get_submodule(unit.name)
        except AttributeError:  # a tensor held directly by a module around the spine
            sized.append(unit)
            continue
        own = _relative(special, unit.name)
        size = compute_module_sizes(module, dtype, own, tensor_sizes=_relative(tensor_sizes, unit.name)).get("", 0)
        sized.append(Unit(unit.name, unit.kind, size))
    return sized


def _relative(by_name: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``by_name`` under module ``prefix``, named relative to it."""
    if not prefix:
        return dict(by_name)
    return {k[len(prefix) + 1:]: v for k, v in by_name.items() if k.startswith(prefix + ".")}


def _cut(weights: Sequence[int], first: int, last: int, capacities: Sequence[int]) -> tuple[int, ...]:
    """Start index of each stage's blocks minimising max(bytes / capacity); every stage gets a block."""
    n, count = len(capacities), len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def ratio(stage: int, i: int, j: int) -> float:
        load = prefix[j] - prefix[i] + (first if stage == 0 else 0) + (last if stage == n - 1 else 0)
        return load / max(capacities[stage], 1)

    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(n + 1)]
    back = [[0] * (count + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for j in range(s, count - (n - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], ratio(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], back[s][j] = value, i
    starts = [0] * n
    j = count
    for s in range(n, 0, -1):
        j = back[s][j]
        starts[s - 1] = j
    return tuple(starts)


def plan_stages(
    model: nn.Module,
    num_stages: int | None = None,
    *,
    budgets: Sequence[Mapping[Device, int]] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    tensor_sizes: Mapping[str, int] | None = None,
) -> StagePlan:
    """Cut ``model`` into stages: ``num_stages`` equal processes, or one per entry of ``budgets``.

    ``budgets[r]`` is process ``r``'s budget per device in bytes (as :func:`~hf_bigmodel.get_max_memory`
    returns); each stage's bytes are balanced against its process's :func:`fast_capacity`.
    ``tensor_sizes``: bytes of quantized weights (their dtype and shape do not say), as the planner takes them.

    >>> blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    >>> plan = plan_stages(nn.Sequential(nn.Embedding(8, 4), blocks, nn.Linear(4, 8)), 2)
    >>> plan.spine, plan.starts
    ('1', (0, 2))
    """
    if budgets is None:
        if num_stages is None or num_stages < 1:
            raise ValueError(f"plan_stages needs num_stages >= 1 or budgets; got num_stages={num_stages!r}.")
        capacities = (1,) * num_stages
    else:
        if num_stages is not None and num_stages != len(budgets):
            raise ValueError(f"num_stages={num_stages} but {len(budgets)} budget(s) were given; give one per stage.")
        capacities = tuple(fast_capacity(b) for b in budgets)
    special = dict(special_dtypes or {})
    no_split = set(no_split_module_classes or ())
    quantized = dict(tensor_sizes or {})
    sizes = compute_module_sizes(model, dtype, special, tensor_sizes=quantized)
    spine = _find_spine(model, no_split, sizes)
    units = _unit_sizes(model, _units(model, spine, sizes), dtype, special, quantized)
    blocks = [u.size for u in units if u.kind == "block"]
    if len(blocks) < len(capacities):
        raise PipelineError(
            f"{type(model).__name__} has {len(blocks)} block(s) in {spine!r}, too few for {len(capacities)} pipeline "
            f"stages (each stage runs at least one block). Start at most {len(blocks)} processes."
        )
    first = sum(u.size for u in units if u.kind == "first")
    last = sum(u.size for u in units if u.kind == "last")
    starts = _cut(blocks, first, last, capacities)
    return StagePlan(spine, tuple(units), starts, capacities if budgets is not None else ())


def stage_device_map(
    model: nn.Module,
    plan: StagePlan,
    stage: int,
    budgets: Mapping[Device, int],
    *,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    offload_buffers: bool = False,
    tensor_sizes: Mapping[str, int] | None = None,
) -> dict[str, Device]:
    """The device map of stage ``stage`` within its own process's ``budgets`` (what does not fit is offloaded).

    Tensors held directly by the modules around the spine stay on the main device (never streamed): the
    code between modules reads them, and no hook would bring them.
    """
    detached = plan.not_held_by(stage)
    with stage_only(model, detached) as view:  # as one process would plan it: rows on disk, prefetch room
        planned = resolve_device_map(
            view, "sequential", max_memory=dict(budgets), no_split_module_classes=no_split_module_classes,
            dtype=dtype, special_dtypes=special_dtypes, offload_buffers=offload_buffers, check_devices=False,
            tensor_sizes=tensor_sizes, main_headroom=prefetch_headroom(offload_buffers=offload_buffers),
        )
    device_map = {k: d for k, d in planned.items() if not any(is_within(k, name) for name in detached)}
    placement = Placement.of(device_map)
    modules = {name for name, _ in model.named_modules()}
    for unit in plan.units:
        if unit.kind == "shared" and unit.name not in modules and placement.is_offloaded(
                placement.stored_on(unit.name)):
            device_map[unit.name] = placement.main
    return device_map
