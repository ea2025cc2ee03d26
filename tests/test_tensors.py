"""The one index of a model's tensors and the one way to put a tensor into a module slot (model/tensors.py).

A parameter keeps its class (a ``Parameter`` subclass), its extra attributes and its ``requires_grad``
flag wherever the library puts a tensor in its slot: loading, dispatch, offloading hooks (while a module
runs and while it waits), and removing the hooks. A model whose forward branches on one of them must give
the undispatched model's output.
"""

from __future__ import annotations

import pytest
import torch
from core_models import save_state
from torch import nn

from hf_bigmodel import (
    compute_module_sizes,
    cpu_offload,
    disk_offload,
    dispatch_model,
    find_tied_parameters,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    remove_hook_from_submodules,
)
from hf_bigmodel.model.tensors import distinct_tensors, model_tensors, set_tensor, tie_groups, with_slot_class


class Tagged(nn.Parameter):
    """A parameter subclass that carries an attribute, as quantised or sharded parameters do."""


class Branching(nn.Module):
    """A forward that depends on the parameter's class, attribute and ``requires_grad`` (as some models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        weight = Tagged(torch.randn(4, 4))
        weight.tag = "scaled"
        self.inner.weight = weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.seen: list[tuple[type, object, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, f = self.inner.weight, self.frozen.weight
        self.seen.append((type(w), getattr(w, "tag", None), w.requires_grad, f.requires_grad))
        y = self.inner(x)
        if isinstance(w, Tagged) and getattr(w, "tag", None) == "scaled":
            y = y * 2
        if w.requires_grad and not f.requires_grad:
            y = y + 1
        return self.frozen(y)


def _reference() -> Branching:
    torch.manual_seed(0)
    return Branching().eval()


def _copy(ref: Branching) -> Branching:
    model = Branching().eval()
    model.load_state_dict(ref.state_dict())
    model.inner.weight.tag = "scaled"
    return model


EXPECTED = (Tagged, "scaled", True, False)


def _check(model: Branching, ref: Branching) -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        model.seen.clear()
        assert torch.equal(model(x), expected)
    assert model.seen == [EXPECTED]
    w = model.inner.weight  # idle (a meta placeholder while hooked): still the same kind of parameter
    kind = Tagged if isinstance(w, Tagged) else type(w)  # a placeholder's class derives from the weight's
    assert (kind, getattr(w, "tag", None), w.requires_grad, model.frozen.weight.requires_grad) == EXPECTED


@pytest.mark.parametrize("prefetch", [0, 2])
def test_offload_hooks_keep_the_parameter_class_attributes_and_requires_grad(tmp_path, prefetch):
    ref = _reference()
    _check(cpu_offload(_copy(ref), execution_device="cpu", prefetch=prefetch), ref)
    model = disk_offload(_copy(ref), tmp_path / "offload", execution_device="cpu", prefetch=prefetch)
    _check(model, ref)
    remove_hook_from_submodules(model)  # back in RAM for good, as the same kind of parameter
    assert model.inner.weight.device.type == "cpu"
    _check(model, ref)


def test_loading_and_dispatch_keep_the_parameter_class_attributes_and_requires_grad(tmp_path):
    ref = _reference()
    save_state(ref, tmp_path / "ckpt")
    for device_map in ({"": "cpu"}, {"inner": "disk", "frozen": "cpu"}, {"inner": "cpu", "frozen": "disk"}):
        with init_empty_weights():
            model = _copy_empty()
        model = load_checkpoint_and_dispatch(model, tmp_path / "ckpt", device_map=device_map,
                                             offload_folder=tmp_path / "off")
        _check(model, ref)
    model = dispatch_model(_copy(ref), {"inner": "disk", "frozen": "cpu"}, offload_dir=tmp_path / "dispatch")
    _check(model, ref)


def _copy_empty() -> Branching:
    model = Branching().eval()
    model.inner.weight.tag = "scaled"
    return model


def test_set_tensor_keeps_class_attributes_and_flag_and_only_float_requires_grad():
    module = nn.Linear(2, 2)
    weight = Tagged(torch.zeros(2, 2))
    weight.tag = "x"
    module.weight = weight
    slot = model_tensors(module)["weight"]
    stored = set_tensor(slot, torch.ones(2, 2))
    assert module.weight is stored and type(stored) is Tagged and stored.tag == "x" and stored.requires_grad
    assert not with_slot_class(torch.ones(2, dtype=torch.int64), weight).requires_grad  # ints cannot
    buffer = torch.ones(3)
    assert with_slot_class(buffer, torch.zeros(3)) is buffer


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.same = self.a  # one module under two names
        self.register_buffer("kept", torch.zeros(2))
        self.register_buffer("scratch", torch.zeros(5), persistent=False)


def test_the_index_agrees_with_torch():
    model = Shared()
    index = model_tensors(model, persistent_only=False)
    assert list(index) == ["kept", "scratch", "a.weight", "a.bias", "b.weight", "b.bias", "same.weight",
                           "same.bias"]
    assert [n for n, s in index.items() if not s.persistent] == ["scratch"]
    assert "scratch" not in model_tensors(model)
    assert set(model_tensors(model)) == set(model.state_dict(keep_vars=True))
    distinct = distinct_tensors(index)
    torch_order = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert list(distinct) == torch_order
    assert tie_groups(index) == find_tied_parameters(model) == [["a.bias", "same.bias"],
                                                                ["a.weight", "b.weight", "same.weight"]]
    sizes = compute_module_sizes(model)
    assert sizes[""] == 4 * (9 + 3 + 3 + 2 + 5)  # each tensor once: a.weight, a.bias, b.bias, kept, scratch
