"""The dispatch plan (runtime/dispatch_plan.py): what goes where, decided on meta models without touching data.

Each test builds the plan alone and checks its decisions; ``no_data_touched`` fails a test if planning
runs any torch operation other than reading a tensor's attributes (device, dtype, shape).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from core_models import TinyLM
from torch.overrides import TorchFunctionMode

from hf_bigmodel import CheckpointMismatchError, OffloadError, init_empty_weights
from hf_bigmodel.model.tensors import model_tensors
from hf_bigmodel.plan.placement import Placement
from hf_bigmodel.runtime.dispatch_plan import DispatchPlan, HookUnit, plan_dispatch
from hf_bigmodel.storage.weights_map import WeightsMap

MIXED = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "blocks.3": "cpu",
         "norm": "disk", "head": "cpu"}


class _Record(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@contextmanager
def no_data_touched() -> Iterator[None]:
    with _Record() as record:
        yield
    assert set(record.calls) <= {"__get__"}, f"planning ran torch operations: {sorted(set(record.calls))}"


def _meta_lm() -> TinyLM:
    with init_empty_weights():
        return TinyLM()


def _plan(model: torch.nn.Module, device_map, *, held=None, main_device=None, **kwargs) -> DispatchPlan:
    """The plan, with the weights map holding ``held`` (default: every state-dict name, as after loading)."""
    slots = model_tensors(model, persistent_only=False)
    held = set(model_tensors(model)) if held is None else held
    weights = WeightsMap(memory={name: slots[name].tensor.to("meta") for name in held})  # shapes and dtypes
    with no_data_touched():
        return plan_dispatch(model, Placement.of(device_map, main_device=main_device), slots, weights, **kwargs)


def test_one_device_means_no_hooks_and_every_empty_tensor_filled():
    model = _meta_lm()
    plan = _plan(model, {"": "cpu"})
    assert not plan.hooked and plan.units == [] and plan.streamed == {}
    assert plan.fill == [n for n, s in model_tensors(model, persistent_only=False).items()
                         if s.tensor.device.type == "meta"]
    assert "blocks.0.scale" not in plan.fill  # a real buffer (built in __init__) keeps its value...
    given = _plan(model, {"": "cpu"}, given={"blocks.0.scale"})
    assert "blocks.0.scale" in given.fill  # ...unless the caller hands one over
    assert "no hooks" in str(plan)


def test_disk_entries_are_streamed_by_their_direct_modules_in_model_order():
    plan = _plan(_meta_lm(), MIXED)
    assert plan.hooked and plan.placement.main == "cpu"
    disk = ["blocks.1.fc1.weight", "blocks.1.fc1.bias", "blocks.1.fc2.weight", "blocks.1.fc2.bias",
            "blocks.2.fc1.weight", "blocks.2.fc1.bias", "blocks.2.fc2.weight", "blocks.2.fc2.bias",
            "norm.weight", "norm.bias"]
    assert list(plan.streamed) == disk and set(plan.streamed.values()) == {"disk"}
    assert "blocks.1.scale" in plan.resident  # buffers of offloaded modules stay, unless offload_buffers
    assert [(u.prefix, u.key, u.device) for u in plan.units] == [
        ("blocks.1.fc1", "blocks.1", "cpu"), ("blocks.1.fc2", "blocks.1", "cpu"),
        ("blocks.2.fc1", "blocks.2", "cpu"), ("blocks.2.fc2", "blocks.2", "cpu"), ("norm", "norm", "cpu")]
    assert plan.units[0].local_names == ["bias", "weight"]  # by name within a module
    assert plan.to_write == {} and plan.to_ram == [] and not plan.pin  # all held (loaded from a checkpoint)
    assert plan.share == {"head.weight": "embed.weight"}  # the tie survives on one device
    assert plan.input_hooks == []  # everything runs on the CPU
    text = str(plan)
    assert "10 streamed (10 from 'disk')" in text and "hook blocks.1.fc1 [blocks.1] -> 'cpu'" in text


def test_cpu_entries_stream_to_an_accelerator_main_device_and_are_pinned():
    device_map = {"embed": 0, "blocks": "cpu", "norm": 0, "head": 0}
    plan = _plan(_meta_lm(), device_map, pin=True)
    assert plan.placement.main == 0
    assert all(n.startswith("blocks.") for n in plan.streamed) and set(plan.streamed.values()) == {"cpu"}
    assert {u.device for u in plan.units} == {0} and plan.pin
    assert plan.pin_blocks == {"blocks": list(plan.streamed)}  # one page-locked arena per device-map entry
    assert plan.resident["blocks.2.scale"] == 0  # kept buffers run on the main device
    assert plan.input_hooks == []  # cpu weights run on GPU 0: one execution device


def test_an_offloaded_tied_alias_of_a_resident_tensor_on_the_same_device_shares_it():
    plan = _plan(_meta_lm(), {"embed": "disk", "blocks": 0, "norm": 0, "head": 0})
    assert "embed.weight" not in plan.streamed and plan.resident["embed.weight"] == 0
    assert plan.share == {"head.weight": "embed.weight"}
    streamed_alias = _plan(_meta_lm(), {"embed": "disk", "blocks": "cpu", "norm": "cpu", "head": "cpu"})
    assert "embed.weight" not in streamed_alias.streamed  # main is the CPU: runs where the resident head runs


def test_a_tied_name_without_value_takes_its_partners_entry():
    model = _meta_lm()
    held = set(model_tensors(model)) - {"head.weight"}
    plan = _plan(model, {"": "disk"}, held=held)
    assert plan.alias == {"head.weight": "embed.weight"} and plan.to_write == {}


def test_tensors_with_no_value_anywhere_fail_before_anything_changes():
    model = _meta_lm()
    with pytest.raises(CheckpointMismatchError, match="blocks.0.fc1.weight"):
        _plan(model, MIXED, held=set())
    with pytest.raises(CheckpointMismatchError, match="embed.weight"):
        _plan(model, {"": "cpu"}, held=set())


def test_tensors_held_by_the_model_on_disk_are_written_once_per_module_or_need_a_folder():
    model = TinyLM()  # real tensors, nothing in the weights map
    plan = _plan(model, MIXED, held=set(), can_write=True)
    assert list(plan.to_write) == ["blocks.1.fc1", "blocks.1.fc2", "blocks.2.fc1", "blocks.2.fc2", "norm"]
    assert plan.to_write["norm"] == ["norm.weight", "norm.bias"]  # model order
    ram = _plan(model, {"embed": 0, "blocks": "cpu", "norm": 0, "head": 0}, held=set())
    assert ram.to_ram == [n for n in ram.streamed] and ram.to_write == {}
    with pytest.raises(OffloadError, match="offload_dir"):
        _plan(model, MIXED, held=set(), can_write=False)


def test_offload_buffers_streams_them_too():
    plan = _plan(_meta_lm(), MIXED, offload_buffers=True)
    assert "blocks.1.scale" in plan.streamed and "blocks.1.offset" in plan.streamed
    assert ("blocks.1", "blocks.1", "cpu") in [(u.prefix, u.key, u.device) for u in plan.units]


def test_preload_module_classes_fetch_a_whole_block_at_once():
    plan = _plan(_meta_lm(), MIXED, preload_module_classes=["Block"])
    assert plan.units == [
        HookUnit("blocks.1", "blocks.1", ("blocks.1.fc1.bias", "blocks.1.fc1.weight", "blocks.1.fc2.bias",
                                         "blocks.1.fc2.weight"), "cpu"),
        HookUnit("blocks.2", "blocks.2", ("blocks.2.fc1.bias", "blocks.2.fc1.weight", "blocks.2.fc2.bias",
                                         "blocks.2.fc2.weight"), "cpu"),
        HookUnit("norm", "norm", ("norm.bias", "norm.weight"), "cpu"),
    ]


def test_a_module_reading_a_child_s_weight_without_calling_it_fetches_that_weight():
    """nn.MultiheadAttention hands ``out_proj.weight`` to a function (out_proj is never called): its own
    unit brings it, instead of a unit for out_proj whose hook would never fire."""
    with init_empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 2))
    plan = _plan(model, {"0": "cpu", "1": "disk"})
    assert [(u.prefix, sorted(u.names)) for u in plan.units] == [
        ("1", ["1.in_proj_bias", "1.in_proj_weight", "1.out_proj.bias", "1.out_proj.weight"])]


def test_model_parallel_maps_get_input_hooks_per_entry():
    device_map = {"embed": 0, "blocks.0": 0, "blocks.1": 1, "blocks.2.fc1.weight": 1, "blocks.2": 0,
                  "blocks.3": 1, "norm": 1, "head": 0}
    plan = _plan(_meta_lm(), device_map, force_hooks=True)
    assert plan.streamed == {} and plan.units == []
    assert plan.input_hooks == [("embed", 0), ("blocks.0", 0), ("blocks.1", 1), ("blocks.2.fc1", 1),
                                ("blocks.2", 0), ("blocks.3", 1), ("norm", 1), ("head", 0)]
    assert plan.resident["blocks.2.fc1.weight"] == 1 and plan.resident["blocks.2.fc1.bias"] == 0


def test_prefetch_groups_are_decided_with_the_plan(monkeypatch):
    from hf_bigmodel.runtime import prefetch_plan

    plan = _plan(_meta_lm(), MIXED)
    assert plan.groups == [[0, 1], [2, 3], [4]]  # one group per device-map entry (each well under GROUP_BYTES)
    assert "prefetch group 1" in str(plan)
    whole = _plan(_meta_lm(), {"": "disk"})
    assert whole.groups == [list(range(len(whole.units)))]  # small: the whole model is one block
    monkeypatch.setattr(prefetch_plan, "GROUP_BYTES", 3000)  # a Block holds 16*32*2*4 + 48*4 = 4288 bytes
    monkeypatch.setattr(prefetch_plan, "MERGE_BYTES", 0)
    cut = _plan(_meta_lm(), {"": "disk"})
    prefixes = [[cut.units[i].prefix for i in group] for group in cut.groups]
    assert prefixes[:3] == [["embed"], ["blocks.0.fc1"], ["blocks.0.fc2"]]  # cut below the blocks
    assert sorted(i for group in cut.groups for i in group) == list(range(len(cut.units)))


def test_an_embedding_on_disk_reads_by_row_and_is_in_no_prefetch_group():
    from hf_bigmodel.storage.safetensors_io import TensorEntry
    from hf_bigmodel.storage.weights_map import DiskTensor

    model = _meta_lm()
    slots = model_tensors(model, persistent_only=False)
    weights = WeightsMap(memory={n: s.tensor.to("meta") for n, s in model_tensors(model).items()})
    entry = TensorEntry("ckpt/model.safetensors", "embed.weight", torch.float32, (50, 16), 0, 50 * 16 * 4)
    del weights.memory["embed.weight"]
    weights.disk["embed.weight"] = DiskTensor(entry, torch.float32)  # a plain byte range of the checkpoint
    device_map = {"embed": "disk", "blocks": "disk", "norm": "cpu", "head": "disk"}
    with no_data_touched():
        plan = plan_dispatch(model, Placement.of(device_map), slots, weights)
    by_row = [i for i, u in enumerate(plan.units) if u.by_row]
    assert [plan.units[i].prefix for i in by_row] == ["embed"]
    assert not any(i in group for group in plan.groups for i in by_row)
    assert sorted(i for group in plan.groups for i in group) == [i for i in range(len(plan.units)) if i not in by_row]
    assert "hook embed [embed] -> 'cpu': 1 tensor(s), read by row" in str(plan)
    in_ram = _plan(model, device_map)  # held in RAM (meta stand-ins): read whole, prefetched
    assert not any(u.by_row for u in in_ram.units)
