"""What a device map costs and how it reads: :class:`PlanReport` (complete, JSON-ready) and its text form.

The text collapses runs of numbered siblings on one device (``model.layers.0-46 -> 0``), so a 126-layer
model prints a handful of rows; the JSON keeps one entry per device-map key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import summarize
from ..model.naming import join, lookup
from ..model.sizes import compute_module_sizes, format_size, is_bits
from ..plan.balance import get_max_layer_size
from ..plan.devices import Device, device_rank
from ..plan.placement import Placement
from ..plan.rows_on_disk import row_embeddings
from ..plan.spread import kept_among_disk
from ..runtime.prefetch_plan import PlannedPrefetch, plan_prefetch
from ..runtime.prefetch_window import ENV_VAR

__all__ = ["PlanReport", "Row", "collapse", "describe_plan", "format_plan"]


@dataclass
class PlanReport:
    """A device map with what it costs: bytes per entry, per device, and the budgets it was planned for.

    ``totals`` counts what each device stores. As the planner assumes, buffers of offloaded modules
    stay on the execution device unless ``offload_buffers``, so they are counted there. ``prefetch``
    is the memory the prefetch window holds on the execution device while the model runs.
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
    prefetch: PlannedPrefetch | None = None
    dtype_assumed: bool = False
    quantized_sizes_unknown: bool = False
    rows_from_disk: list[str] = field(default_factory=list)  # embeddings on disk that read only their batch's rows
    kept_among_disk: list[str] = field(default_factory=list)  # blocks in RAM spread among their family's on disk

    @property
    def disk_modules(self) -> list[str]:
        """Device-map entries whose weights stay on disk."""
        return [name for name, device in self.device_map.items() if device == "disk"]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; device keys become strings (``"0"``, ``"cpu"``, ``"disk"``), sizes are bytes."""
        window = self.prefetch
        return {
            "model": self.model,
            "model_class": self.model_class,
            "dtype": self.dtype,
            "dtype_assumed": self.dtype_assumed,
            "quantized_sizes_unknown": self.quantized_sizes_unknown,
            "device_map": dict(self.device_map),
            "sizes": dict(self.sizes),
            "totals": {str(d): n for d, n in self.totals.items()},
            "budgets": {str(d): n for d, n in self.budgets.items()},
            "max_memory": {str(d): text for d, text in self.typed_budgets.items()},
            "total_size": self.total_size,
            "execution_device": self.execution_device,
            "disk": self.disk_modules,
            "rows_from_disk": list(self.rows_from_disk),
            "kept_among_disk": list(self.kept_among_disk),
            "no_split_module_classes": list(self.no_split_module_classes),
            "largest_offloaded_layer": (
                {"name": self.largest_offloaded_layer[0], "size": self.largest_offloaded_layer[1]}
                if self.largest_offloaded_layer else None
            ),
            "prefetch": None if window is None else {
                "device": window.device, "window": window.window_text, "total": window.total,
                "groups": window.groups, "largest_group": list(window.largest),
                "largest_group_size": window.largest_bytes,
            },
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
    tensor_sizes: Mapping[str, int] | None = None,
) -> PlanReport:
    """Measure ``device_map`` on ``model`` (meta tensors are fine) into a :class:`PlanReport`.

    ``tensor_sizes``: bytes of quantized weights, as the planner was given them.

    Example::

        report = describe_plan(model, model.hf_device_map, budgets={"cpu": 2**20}, name="tiny")
        print(format_plan(report))
    """
    sizes = compute_module_sizes(model, dtype, special_dtypes, tensor_sizes=tensor_sizes)
    buffers = compute_module_sizes(model, dtype, special_dtypes, buffers_only=True, tensor_sizes=tensor_sizes)
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
        prefetch=plan_prefetch(model, device_map, sizes=sizes, offload_buffers=offload_buffers),
        rows_from_disk=[name for name in row_embeddings(model, tensor_sizes)
                        if lookup(join(name, "weight"), device_map) == "disk"],
        kept_among_disk=kept_among_disk(model, device_map, sizes),
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


# -- text -------------------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^(?P<stem>(?:.*\.)?)(?P<index>\d+)$")


@dataclass(frozen=True)
class Row:
    """One line of the module table: a device-map entry, or a run of numbered siblings on one device."""

    label: str
    device: Device
    sizes: tuple[int, ...]

    @property
    def size(self) -> str:
        """``"8.00 KiB"``; for a run, the total and the size each when they are equal."""
        total = format_size(sum(self.sizes))
        if len(self.sizes) > 1 and len(set(self.sizes)) == 1:
            return f"{total} ({len(self.sizes)} x {format_size(self.sizes[0])})"
        return total


def collapse(entries: Mapping[str, Device], sizes: Mapping[str, int], *, spread: bool = False) -> list[Row]:
    """Entries in order, with runs of consecutive numbered siblings on one device made one row; ``spread``:
    also runs that alternate between RAM and disk (the strategies spread them, :mod:`hf_bigmodel.plan.spread`),
    their device the count on each.

    >>> [(r.label, r.device) for r in collapse({"emb": 0, "layers.0": 0, "layers.1": 0, "layers.2": "cpu"}, {})]
    [('emb', 0), ('layers.0-1', 0), ('layers.2', 'cpu')]
    >>> mixed = {f"layers.{i}": "cpu" if i % 3 == 1 else "disk" for i in range(7)}
    >>> [(r.label, r.device) for r in collapse(mixed, {}, spread=True)]
    [('layers.0-6', 'cpu x2, disk x5 (spread)')]
    """
    # (stem, first index, last index, device, sizes); index -1: a name that is not numbered
    rows: list[tuple[str, int, int, Device, list[int]]] = []
    for name, device in entries.items():
        match = _NUMBERED.match(name)
        stem, index = (match["stem"], int(match["index"])) if match else (name, -1)
        if match and rows and rows[-1][0] == stem and rows[-1][2] == index - 1 and rows[-1][3] == device:
            rows[-1] = (stem, rows[-1][1], index, device, [*rows[-1][4], sizes.get(name, 0)])
        else:
            rows.append((stem, index, index, device, [sizes.get(name, 0)]))
    if spread:
        rows = _merge_spread(rows)
    result = []
    for stem, first, last, device, run in rows:
        label = stem if first < 0 else f"{stem}{first}" if first == last else f"{stem}{first}-{last}"
        result.append(Row(label or "(whole model)", device, tuple(run)))
    return result


def _merge_spread(rows: list[tuple[str, int, int, Device, list[int]]]) -> list[tuple[str, int, int, Device, list[int]]]:
    """Runs of rows of one stem, each on ``cpu`` or ``disk``, one after another: one row when they alternate
    (three rows or more), its device ``"cpu xN, disk xM (spread)"``."""
    merged: list[tuple[str, int, int, Device, list[int]]] = []
    i = 0
    while i < len(rows):
        j = i
        while (j + 1 < len(rows) and rows[i][1] >= 0 and rows[j + 1][0] == rows[i][0]
               and rows[j + 1][1] == rows[j][2] + 1 and {rows[j][3], rows[j + 1][3]} <= {"cpu", "disk"}):
            j += 1
        if j - i >= 2:
            counts = {kind: sum(r[2] - r[1] + 1 for r in rows[i : j + 1] if r[3] == kind) for kind in ("cpu", "disk")}
            device = f"cpu x{counts['cpu']}, disk x{counts['disk']} (spread)"
            merged.append((rows[i][0], rows[i][1], rows[j][2], device, [n for r in rows[i : j + 1] for n in r[4]]))
        else:
            merged.extend(rows[i : j + 1])
        i = j + 1
    return merged


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
    """The plan as text: module runs, per-device totals against budgets, disk and prefetch summaries.

    Example output::

        ./llama: LlamaForCausalLM, 34.34 KiB in float32
        module              size                    device
        model.embed_tokens  8.00 KiB                cpu
        model.layers.0-1    18.25 KiB (2 x 9.12 KiB)  disk
        ...
        device  planned    budget     used
        cpu     8.03 KiB   19.53 KiB  41%
        disk    26.31 KiB  unlimited
    """
    dtype = report.dtype or "no floating-point dtype"
    if report.dtype_assumed:
        dtype += " (assumed: the config names no dtype and no weights were read; pass --dtype)"
    if report.quantized_sizes_unknown:
        dtype += (" (quantized weights counted at this dtype's size, more than they take: their checkpoint's "
                  "headers were not read; plan a local copy for exact sizes)")
    title = f"{report.model or report.model_class}: {report.model_class}, {format_size(report.total_size)} in {dtype}"
    lines = [title]
    if report.no_split_module_classes:
        lines.append(f"Never split: {', '.join(report.no_split_module_classes)}")
    lines.append("")
    rows = [["module", "size", "device"]]
    rows += [[row.label, row.size, str(row.device)] for row in collapse(report.device_map, report.sizes, spread=True)]
    lines += _table(rows)
    lines.append("")
    lines += _device_table(report)
    lines += _budget_lines(report)
    lines.append("")
    lines += _offload_lines(report)
    return "\n".join(lines)


def _device_table(report: PlanReport) -> list[str]:
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
    return _table(rows, right=[1, 2, 3])


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


def _offload_lines(report: PlanReport) -> list[str]:
    """What goes to disk, the room kept for the largest offloaded layer, and the prefetch window."""
    lines = []
    disk = {name: device for name, device in report.device_map.items() if device == "disk"}
    where = report.execution_device
    if disk:
        labels = [row.label for row in collapse(disk, report.sizes)]
        lines.append(f"On disk: {len(disk)} module(s), {format_size(report.totals.get('disk', 0))}: "
                     f"{summarize(labels)}. Their weights are read when they run, on {where!r}.")
        if report.rows_from_disk:
            lines.append(f"Read by row from disk: {summarize(report.rows_from_disk)}: an embedding reads only the rows "
                         "of its batch's tokens (a few KiB per decode step; a long prompt reads it whole).")
        if report.kept_among_disk:
            lines.append(f"Kept in RAM between blocks read from disk: {summarize(report.kept_among_disk)}: spread "
                         "among them, so that reading ahead never waits through a long stretch of compute.")
    else:
        lines.append("Nothing goes to disk.")
    if report.largest_offloaded_layer:
        name, size = report.largest_offloaded_layer
        lines.append(f"Largest offloaded layer: {name or '(whole model)'} ({format_size(size)}); the planner keeps "
                     f"room for it on {where!r}, where offloaded layers run one at a time.")
    window = report.prefetch
    if window is not None:
        lines.append(
            f"Prefetching: up to {format_size(window.total)} on {window.device!r} while the model runs: the "
            f"group in use (the largest of {window.groups}: {_common(window.largest)}, "
            f"{format_size(window.largest_bytes)}) and {window.window_text} read ahead ({ENV_VAR} sets it)."
        )
        placed = report.totals.get(window.device, 0)
        lines.append(
            f"Peak memory on {window.device!r} while the model runs: {format_size(placed)} of weights placed there "
            f"+ {format_size(window.total)} prefetching = {format_size(placed + window.total)}, beside the "
            "runtime (Python, torch and the libraries, a few hundred MiB on CPU) and the activations."
        )
    return lines


def _common(names: Sequence[str]) -> str:
    """The module holding all of ``names`` (``model.layers.3``), else the names themselves, cut short."""
    parts = [name.split(".") for name in names]
    shared: list[str] = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        shared.append(level[0])
    return ".".join(shared) or summarize(names, 3)
