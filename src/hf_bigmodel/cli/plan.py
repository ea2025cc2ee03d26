"""``hf-bigmodel plan``: build a model empty from its config, plan its device map, print it.

Nothing here downloads weights or allocates them: the model is built on the meta device with the
same :class:`~hf_bigmodel.hf.pretrained.PretrainedLoader` steps :func:`load_pretrained_dispatched` runs,
and planned with the library's planner, so the printed plan is the one a load would use.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import summarize
from ..model.sizes import compute_module_sizes, format_size, is_bits
from ..plan.devices import Device, device_rank
from ..plan.memory import get_max_memory
from ..plan.placement import Placement
from ..plan.planner import get_max_layer_size
from .model import EmptyModel, Source, build_empty_model
from .options import parse_dtype, parse_max_memory, typed_max_memory, usage_error

__all__ = ["PlanReport", "describe_plan", "format_plan", "plan_command"]

logger = logging.getLogger(__name__)


@dataclass
class PlanReport:
    """A device map with what it costs: bytes per entry, per device, and the budgets it was planned for.

    ``totals`` counts what each device stores. As the planner assumes, buffers of offloaded modules
    stay on the execution device unless ``offload_buffers``, so they are counted there.
    """

    model: str
    model_class: str
    dtype: str | None
    device_map: dict[str, Device]
    sizes: dict[str, int]
    totals: dict[Device, int]
    budgets: dict[Device, int]
    total_size: int
    execution_device: Device
    no_split_module_classes: list[str] = field(default_factory=list)
    largest_offloaded_layer: tuple[str, int] | None = None
    typed_budgets: dict[Device, str] = field(default_factory=dict)

    @property
    def disk_modules(self) -> list[str]:
        """Device-map entries whose weights stay on disk."""
        return [name for name, device in self.device_map.items() if device == "disk"]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; device keys become strings (``"0"``, ``"cpu"``, ``"disk"``), sizes are bytes."""
        return {
            "model": self.model,
            "model_class": self.model_class,
            "dtype": self.dtype,
            "device_map": dict(self.device_map),
            "sizes": dict(self.sizes),
            "totals": {str(d): n for d, n in self.totals.items()},
            "budgets": {str(d): n for d, n in self.budgets.items()},
            "max_memory": {str(d): text for d, text in self.typed_budgets.items()},
            "total_size": self.total_size,
            "execution_device": self.execution_device,
            "disk": self.disk_modules,
            "no_split_module_classes": list(self.no_split_module_classes),
            "largest_offloaded_layer": (
                {"name": self.largest_offloaded_layer[0], "size": self.largest_offloaded_layer[1]}
                if self.largest_offloaded_layer else None
            ),
        }


def describe_plan(
    model: nn.Module,
    device_map: Mapping[str, Device],
    *,
    budgets: Mapping[Device, int],
    dtype: torch.dtype | None = None,
    special_dtypes: Mapping[str, torch.dtype] | None = None,
    offload_buffers: bool = False,
    name: str = "",
    no_split_module_classes: Sequence[str] = (),
) -> PlanReport:
    """Measure ``device_map`` on ``model`` (meta tensors are fine) into a :class:`PlanReport`.

    Example::

        report = describe_plan(model, model.hf_device_map, budgets={"cpu": 2**20}, name="tiny")
        print(format_plan(report))
    """
    sizes = compute_module_sizes(model, dtype, special_dtypes)
    buffers = compute_module_sizes(model, dtype, special_dtypes, buffers_only=True)
    placement = Placement.of(device_map)
    executor, offloaded = placement.main, placement.offload_targets
    totals: dict[Device, int] = {}
    for entry, device in device_map.items():
        stored = sizes.get(entry, 0)
        kept = buffers.get(entry, 0) if device in offloaded and not offload_buffers else 0
        totals[device] = totals.get(device, 0) + stored - kept
        if kept:
            totals[executor] = totals.get(executor, 0) + kept
    order = sorted(set(totals) | set(budgets), key=device_rank)
    streamed = [(entry, model.get_submodule(entry)) for entry, device in device_map.items()
                if device in offloaded and _is_module(model, entry)]
    layer_size, layer_names = get_max_layer_size(streamed, sizes, no_split_module_classes)
    return PlanReport(
        model=name,
        model_class=type(model).__name__,
        dtype=_dtype_name(model, dtype),
        device_map=dict(device_map),
        sizes={entry: sizes.get(entry, 0) for entry in device_map},
        totals={d: totals.get(d, 0) for d in order},
        budgets={d: budgets[d] for d in order if d in budgets and d != "disk"},
        total_size=sizes.get("", 0),
        execution_device=executor,
        no_split_module_classes=list(no_split_module_classes),
        largest_offloaded_layer=(layer_names[0], layer_size) if layer_names else None,
    )


def _dtype_name(model: nn.Module, dtype: torch.dtype | None) -> str | None:
    """``"float16"``; without a load dtype, the floating-point dtype(s) the model was built in."""
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    found = sorted({str(t.dtype).removeprefix("torch.") for t in model.parameters() if t.is_floating_point()})
    return "/".join(found) or None


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _table(rows: Sequence[Sequence[str]], *, right: Iterable[int] = ()) -> list[str]:
    """Rows as aligned text columns (the first row is the header); columns in ``right`` right-aligned."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_plan(report: PlanReport) -> str:
    """The plan as text: module table, per-device totals against budgets, and the disk summary.

    Example output::

        module          size       device
        model.embed_tokens  8.00 KiB  cpu
        ...
        device  planned    budget     used
        cpu     19.50 KiB  20.00 KiB  98%
        disk    16.25 KiB  unlimited
    """
    dtype = report.dtype or "no floating-point dtype"
    title = f"{report.model or report.model_class}: {report.model_class}, {format_size(report.total_size)} in {dtype}"
    lines = [title]
    if report.no_split_module_classes:
        lines.append(f"Never split: {', '.join(report.no_split_module_classes)}")
    lines.append("")
    rows = [["module", "size", "device"]]
    rows += [[name or "(whole model)", format_size(report.sizes[name]), str(device)]
             for name, device in report.device_map.items()]
    lines += _table(rows, right=[1])
    lines.append("")
    rows = [["device", "planned", "budget", "used"]]
    for device, total in report.totals.items():
        budget = report.budgets.get(device)
        if device == "disk":
            rows.append([device, format_size(total), "unlimited", ""])
        elif budget is None:
            rows.append([str(device), format_size(total), "none given", ""])
        else:
            used = f"{100 * total / budget:.0f}%" if budget else ("0%" if not total else "over")
            rows.append([str(device), format_size(total), format_size(budget), used])
    lines += _table(rows, right=[1, 2, 3])
    lines += _budget_lines(report)
    lines.append("")
    disk = report.disk_modules
    if disk:
        lines.append(
            f"On disk: {len(disk)} module(s), {format_size(report.totals.get('disk', 0))}: "
            f"{summarize(name or '(whole model)' for name in disk)}. "
            f"Their weights are read when they run, on {report.execution_device!r}."
        )
    if report.largest_offloaded_layer:
        name, size = report.largest_offloaded_layer
        lines.append(
            f"Largest offloaded layer: {name or '(whole model)'} ({format_size(size)}); the planner keeps room for "
            f"it on {report.execution_device!r}, where offloaded layers run one at a time."
        )
    else:
        lines.append("Nothing goes to disk.")
    return "\n".join(lines)


def _budget_lines(report: PlanReport) -> list[str]:
    """Each budget in bytes as it was read (``--max-memory`` or measured), flagging sizes read in bits."""
    if not report.budgets:
        return []
    source = "--max-memory" if report.typed_budgets else "free memory measured now"
    shown = []
    for device, size in report.budgets.items():
        typed = report.typed_budgets.get(device)
        note = f" from {typed!r}" if typed else ""
        if typed and is_bits(typed):
            note += " (a lower-case b means bits, as in accelerate; B is bytes)"
        shown.append(f"{device}={size:,} bytes{note}")
    return [f"Budgets ({source}): {'; '.join(shown)}."]


def _check_no_split(model: nn.Module, requested: Sequence[str]) -> None:
    """Every ``--no-split`` class must be a class of the model; all unknown ones are reported at once."""
    present = {type(m).__name__ for m in model.modules()}
    unknown = [c for c in dict.fromkeys(requested) if c not in present]
    if not unknown:
        return
    shown = []
    for cls in unknown:
        close = difflib.get_close_matches(cls, present, n=1)
        shown.append(f"{cls!r} (did you mean {close[0]!r}?)" if close else repr(cls))
    raise usage_error(
        f"argument --no-split: {type(model).__name__} has no module of class {summarize(shown)}. "
        f"Its classes: {summarize(sorted(present))}."
    )


def plan_empty(
    empty: EmptyModel,
    budgets: Mapping[Device, int] | None,
    *,
    no_split: Sequence[str] = (),
    name: str = "",
) -> PlanReport:
    """Plan ``device_map="auto"`` for an empty model within ``budgets`` (``None``: this machine's free memory).

    Devices in ``budgets`` need not exist here; planning is pure.
    """
    from ..plan.device_map import resolve_device_map

    _check_no_split(empty.model, no_split)
    classes = list(dict.fromkeys([*sorted(empty.no_split), *no_split]))  # sorted: the model may give a set
    resolved = dict(budgets) if budgets is not None else get_max_memory(None)
    device_map = resolve_device_map(
        empty.model, "auto", max_memory=resolved, no_split_module_classes=classes, dtype=empty.dtype,
        special_dtypes=empty.special_dtypes, check_devices=False,
    )
    return describe_plan(
        empty.model, device_map, budgets=resolved, dtype=empty.dtype, special_dtypes=empty.special_dtypes,
        name=name, no_split_module_classes=classes,
    )


def plan_command(args: argparse.Namespace) -> int:
    """``hf-bigmodel plan``: print the plan as a table (or JSON with ``--json``)."""
    budgets = parse_max_memory(args.max_memory)
    dtype = parse_dtype(args.dtype)
    empty = build_empty_model(Source.from_args(args), dtype=dtype)
    report = plan_empty(empty, budgets, no_split=args.no_split, name=args.model)
    report.typed_budgets = typed_max_memory(args.max_memory)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(report))
    return 0
