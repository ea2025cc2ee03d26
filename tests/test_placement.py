"""One rule for where weights are stored and where they run, shared by the planner, dispatch and the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_bigmodel import dispatch_model, infer_auto_device_map
from hf_bigmodel.cli.plan import describe_plan
from hf_bigmodel.cli.run import execution_device
from hf_bigmodel.plan.placement import Placement, main_device_of


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    ("device_map", "main", "offloaded"),
    [
        ({"": "cpu"}, "cpu", {"disk"}),
        ({"0": 0, "2": "cpu"}, 0, {"cpu", "disk"}),
        ({"0": "cpu", "2": "disk"}, "cpu", {"disk"}),
        ({"0": 1, "2": 0}, 0, {"cpu", "disk"}),
        ({"": "disk"}, "cpu", {"disk"}),
    ],
)
def test_the_rule(device_map, main, offloaded) -> None:
    placement = Placement.of(device_map)
    assert placement.main == main
    assert set(placement.offload_targets) == offloaded
    for name, device in device_map.items():
        runs = main if device in offloaded else device
        assert placement.runs_on(name + ".weight" if name else "x") == runs


def test_an_explicit_main_device_and_offload_flag_win() -> None:
    placement = Placement.of({"": "cpu"}, main_device="cuda:1", offload_cpu=True)
    assert placement.main == 1 and placement.is_offloaded("cpu") and placement.runs_on("a.b") == 1
    with pytest.raises(ValueError, match="only stores"):
        Placement.of({"": "cpu"}, main_device="disk")


def test_main_device_of_orders_gpus_by_index() -> None:
    assert main_device_of([3, "cpu", 1]) == 1 and main_device_of(["disk"]) == "cpu"


def test_a_gpu_budget_too_small_for_anything_means_the_plan_runs_on_the_cpu() -> None:
    """max_memory={0: 1000, "cpu": 1e9}: everything on cpu; planner, dispatch and the CLI all say cpu."""
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that offloaded weights would run on GPU 0
        device_map = infer_auto_device_map(model, {0: 1000, "cpu": 10**9})
    assert device_map == {"": "cpu"}
    assert Placement.of(device_map).main == "cpu"
    assert execution_device(device_map) == torch.device("cpu")
    report = describe_plan(model, device_map, budgets={0: 1000, "cpu": 10**9})
    assert report.execution_device == "cpu"
    dispatched = dispatch_model(model, device_map)
    assert dispatched.device == torch.device("cpu") and "_hf_hook" not in dispatched.__dict__


def test_a_gpu_that_keeps_a_layer_is_the_main_device() -> None:
    model = _model()
    device_map = infer_auto_device_map(model, {0: 16 * 17 * 4 * 2 + 200, "cpu": 300}, dtype=torch.float32)
    assert 0 in device_map.values()
    assert Placement.of(device_map).main == 0
    assert describe_plan(model, device_map, budgets={0: 10**6, "cpu": 300}).execution_device == 0
