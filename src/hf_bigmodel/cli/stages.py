"""``hf-bigmodel plan MODEL --stages N``: the cut of a pipeline of N processes, without loading anything.

Every process of a pipeline is started with the same command, so each plans its stage within the same
``--max-memory`` (per process); without it, within this machine's free memory split N ways.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PipelineError
from ..model.sizes import format_size
from ..parallel.stages import StagePlan, plan_stages, stage_device_map
from ..plan.devices import Device
from ..plan.memory import get_max_memory
from .model import EmptyModel
from .options import usage_error

__all__ = ["print_stages"]


def _budgets(budgets: Mapping[Device, int] | None, stages: int) -> dict[Device, int]:
    if budgets is not None:
        return dict(budgets)
    measured = get_max_memory(None)
    return {d: (v // stages if d == "cpu" else v) for d, v in measured.items()}


def _stage_rows(empty: EmptyModel, plan: StagePlan, budgets: Mapping[Device, int],
                no_split: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for stage in range(plan.num_stages):
        device_map = stage_device_map(empty.model, plan, stage, budgets, no_split_module_classes=no_split,
                                      dtype=empty.dtype, special_dtypes=empty.special_dtypes,
                                      tensor_sizes=empty.tensor_sizes)
        start, stop = plan.block_range(stage)
        rows.append({"stage": stage, "blocks": [start, stop], "bytes": plan.bytes_of(stage),
                     "units": [n for n in plan.held_by(stage) if plan.stage_of(n) == stage],
                     "device_map": {k: str(v) for k, v in device_map.items()}})
    return rows


def print_stages(empty: EmptyModel, stages: int, budgets: Mapping[Device, int] | None, *,
                 no_split: Sequence[str], name: str, as_json: bool) -> None:
    """Print how ``stages`` processes would split ``empty.model``, and where each keeps its stage."""
    per_process = _budgets(budgets, stages)
    classes = list(dict.fromkeys([*sorted(empty.no_split), *no_split]))
    try:
        plan = plan_stages(empty.model, budgets=[per_process] * stages, no_split_module_classes=classes,
                           dtype=empty.dtype, special_dtypes=empty.special_dtypes, tensor_sizes=empty.tensor_sizes)
    except PipelineError as err:  # too few blocks, or none to cut between: the command line must change
        raise usage_error(f"--stages {stages}: {err}") from err
    rows = _stage_rows(empty, plan, per_process, classes)
    if as_json:
        payload = {"model": name, "model_class": type(empty.model).__name__, "spine": plan.spine,
                   "budget_per_process": {str(d): v for d, v in per_process.items()}, "stages": rows,
                   "shared": [u.name for u in plan.units if u.kind == "shared"]}
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    budget = ", ".join(f"{d}={format_size(v)}" for d, v in per_process.items())
    print(f"{name} ({type(empty.model).__name__}) in {stages} pipeline stages, one per process "
          f"(torchrun --nproc-per-node {stages}), each within {budget}:")
    for line, row in zip(plan.describe().splitlines(), rows):
        on_disk = [k for k, d in row["device_map"].items() if d == "disk"]
        where = f"{len(on_disk)} entr{'y' if len(on_disk) == 1 else 'ies'} on disk" if on_disk else "all in memory"
        print(f"  {line}; {where}")
    shared = [u.name for u in plan.units if u.kind == "shared"]
    if shared:
        print(f"  every stage: {', '.join(shared)}")
