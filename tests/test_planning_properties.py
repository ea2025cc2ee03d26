"""Property tests of the planner over random module trees, ties and budgets.

Every plan must place each tensor exactly once, keep no-split blocks and tied parameters whole, and hold
every non-disk budget, counting the execution device's reservation whenever something is offloaded. The
checker below recomputes all of that from the model and the returned map, independently of the planner.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hf_bigmodel.model.empty import init_empty_weights
from hf_bigmodel.model.naming import lookup, owner, parent
from hf_bigmodel.model.sizes import compute_module_sizes, find_tied_parameters
from hf_bigmodel.plan.memory import get_max_memory
from hf_bigmodel.plan.placement import Placement
from hf_bigmodel.plan.planner import infer_auto_device_map

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NO_SPLIT = ["NoSplit"]


class Leaf(nn.Module):
    def __init__(self, numel: int, buffer: int, buffer_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))
        if buffer:
            self.register_buffer("stat", torch.zeros(buffer, dtype=buffer_dtype))


class Split(nn.Module):
    def __init__(self, direct: int, children: list[nn.Module]) -> None:
        super().__init__()
        if direct:
            self.scale = nn.Parameter(torch.zeros(direct))
        self.parts = nn.ModuleList(children)


class NoSplit(Split):
    pass


def _node(draw: st.DrawFn, depth: int) -> nn.Module:
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        numel = draw(st.integers(0, 40))
        buffer = draw(st.sampled_from([0, 0, 0, 4, 16]))
        return Leaf(numel, buffer, draw(st.sampled_from([torch.float32, torch.int64])))
    cls = draw(st.sampled_from([Split, Split, NoSplit]))
    direct = draw(st.sampled_from([0, 0, 3, 10]))
    children = [_node(draw, depth - 1) for _ in range(draw(st.integers(1, 3)))]
    return cls(direct, children)


@st.composite
def models(draw: st.DrawFn) -> nn.Module:
    with init_empty_weights():
        model = _node(draw, 3)
    leaves = [m for m in model.modules() if isinstance(m, Leaf)]
    for _ in range(draw(st.integers(0, min(3, len(leaves) // 2)))):
        first, second = draw(st.lists(st.sampled_from(range(len(leaves))), min_size=2, max_size=2, unique=True))
        leaves[second].weight = leaves[first].weight
    return model


@st.composite
def budgets(draw: st.DrawFn, total: int) -> dict:
    sizes = st.integers(0, total + total // 2 + 1)
    max_memory: dict = {i: draw(sizes) for i in range(draw(st.integers(0, 3)))}
    if draw(st.booleans()):
        max_memory["cpu"] = draw(sizes)
    return max_memory


def _bytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and tensor.is_floating_point():
        return tensor.numel() * dtype.itemsize
    return tensor.numel() * tensor.element_size()


def _splittable(module: nn.Module) -> bool:
    return len(module._modules) > 0 and type(module).__name__ not in NO_SPLIT


def _ancestors(name: str) -> list[str]:
    """Proper ancestors of ``name``, root first."""
    chain = []
    while name:
        name = parent(name)
        chain.append(name)
    return chain[::-1]


def check_plan(model: nn.Module, device_map: dict, max_memory: dict, *, dtype, offload_buffers: bool,
               warned: bool) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = [(n, t, False) for n, t in model.named_parameters(remove_duplicate=False)]
    tensors += [(n, t, True) for n, t in model.named_buffers(remove_duplicate=False)]
    keys = set(device_map)
    assert keys <= set(modules) | {n for n, _, _ in tensors}
    for key in keys:  # disjoint keys: each tensor has exactly one covering key
        assert not keys.intersection(_ancestors(key)), key
        # no key inside a no-split block or a leaf module
        assert all(_splittable(modules[a]) for a in _ancestors(key)), key
    for name, _, _ in tensors:
        assert owner(name, keys) is not None, name
    for group in find_tied_parameters(model):
        assert len({lookup(name, device_map) for name in group}) == 1, group

    memory = get_max_memory(max_memory, check_devices=False)
    placement = Placement.of(device_map)  # the one rule dispatch uses: first accelerator the map uses, else cpu
    executor, offloaded = placement.main, placement.offload_targets
    used: dict = defaultdict(int)
    layers: dict = defaultdict(dict)
    seen: set[int] = set()
    anything_offloaded = False
    for name, tensor, is_buffer in tensors:
        device = lookup(name, device_map)
        size = _bytes(tensor, dtype)
        kept = is_buffer and not offload_buffers
        if id(tensor) not in seen:
            seen.add(id(tensor))
            used[executor if kept and device in offloaded else device] += size
        if device in offloaded:
            anything_offloaded = True
            if not kept:  # moved to the executor when its layer runs
                layer = next((a for a in _ancestors(name) if not _splittable(modules[a])), parent(name))
                layers[layer][id(tensor)] = size
    if anything_offloaded:
        used[executor] += max((sum(v.values()) for v in layers.values()), default=0)
    for device, size in used.items():
        if device == "disk" or device not in memory:
            continue
        if device == executor and warned:
            # the planner only warns when even an empty executor cannot run the offloaded layers
            assert size > memory[device]
            continue
        assert size <= memory[device], (device, size, memory[device])


@given(data=st.data(), model=models())
@SETTINGS
def test_random_plans_hold_every_invariant(data, model):
    dtype = data.draw(st.sampled_from([None, torch.float16]))
    total = compute_module_sizes(model, dtype)[""]
    max_memory = data.draw(budgets(total))
    offload_buffers = data.draw(st.booleans())
    fallback = data.draw(st.booleans())
    plans = {}
    for clean in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans[clean] = infer_auto_device_map(
                model, max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype, clean_result=clean,
                offload_buffers=offload_buffers, fallback_allocation=fallback,
            )
        warned = any("Offloaded weights run on" in str(w.message) for w in caught)
        check_plan(model, plans[clean], max_memory, dtype=dtype, offload_buffers=offload_buffers, warned=warned)
    # cleaning only merges entries: every tensor lands on the same device either way
    for name, _ in model.named_parameters(remove_duplicate=False):
        assert lookup(name, plans[True]) == lookup(name, plans[False])
    assert len(plans[True]) <= len(plans[False])


@given(data=st.data(), model=models())
@SETTINGS
def test_a_model_that_fits_the_first_device_is_never_offloaded(data, model):
    total = compute_module_sizes(model)[""]
    first = data.draw(st.sampled_from([0, "mps", "cpu"]))
    max_memory = {"cpu": data.draw(st.integers(0, 10))}
    max_memory[first] = data.draw(st.integers(total, total * 2 + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device_map = infer_auto_device_map(model, max_memory, no_split_module_classes=NO_SPLIT)
    assert device_map == {"": first}
