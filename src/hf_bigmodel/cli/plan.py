"""``hf-bigmodel plan``: build a model empty from its config, plan its device map, print it (:mod:`.report`).

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
from collections.abc import Mapping, Sequence

from torch import nn

from ..errors import summarize
from ..plan.devices import Device
from ..plan.memory import get_max_memory
from ..runtime.prefetch_plan import prefetch_headroom
from .model import EmptyModel, Source, build_empty_model
from .options import parse_dtype, parse_max_memory, typed_max_memory, usage_error
from .report import PlanReport, describe_plan, format_plan

__all__ = ["plan_command", "plan_empty"]

logger = logging.getLogger(__name__)


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
        special_dtypes=empty.special_dtypes, check_devices=False, tensor_sizes=empty.tensor_sizes,
        main_headroom=prefetch_headroom(),
    )
    report = describe_plan(
        empty.model, device_map, budgets=resolved, dtype=empty.dtype, special_dtypes=empty.special_dtypes,
        name=name, no_split_module_classes=classes, tensor_sizes=empty.tensor_sizes,
    )
    report.dtype_assumed = empty.dtype_assumed
    report.quantized_sizes_unknown = empty.quantized_sizes_unknown
    return report


def plan_command(args: argparse.Namespace) -> int:
    """``hf-bigmodel plan``: print the plan as a table (or JSON with ``--json``)."""
    budgets = parse_max_memory(args.max_memory)
    dtype = parse_dtype(args.dtype)
    empty = build_empty_model(Source.from_args(args), dtype=dtype)
    if args.stages:
        from .stages import print_stages

        print_stages(empty, args.stages, budgets, no_split=args.no_split, name=args.model, as_json=args.json)
        return 0
    report = plan_empty(empty, budgets, no_split=args.no_split, name=args.model)
    report.typed_budgets = typed_max_memory(args.max_memory)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(report))
    return 0
