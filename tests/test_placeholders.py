"""Idle placeholders of offloaded weights (runtime/placeholders.py): meta tensors that refuse to be computed with.

torch computes ``F.linear(x, meta)`` and ``x @ meta`` on CPU without complaint, returning whatever memory
held; a placeholder raises instead, naming the weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_bigmodel import OffloadedWeightUseError, dispatch_model
from hf_bigmodel.runtime.placeholders import OffloadedPlaceholder, idle_placeholder


class Tagged(nn.Parameter):
    pass


def _placeholder() -> torch.Tensor:
    like = Tagged(torch.empty(4, 4, device="meta"))
    like.tag = "q"
    return idle_placeholder(like, "block.proj.weight")


def test_torch_computes_with_a_bare_meta_tensor_silently():
    """Why placeholders exist: a plain meta weight gives a result of uninitialised memory."""
    assert F.linear(torch.ones(2, 4), torch.empty(4, 4, device="meta")).device.type == "cpu"


@pytest.mark.parametrize("use", [
    lambda w, x: F.linear(x, w), lambda w, x: x @ w, lambda w, x: torch.mm(x, w), lambda w, x: x @ w.T,
    lambda w, x: x @ w.to(torch.float64).to(torch.float32), lambda w, x: F.embedding(torch.tensor([1]), w),
])
def test_a_placeholder_mixed_with_real_data_raises_naming_the_weight(use):
    with pytest.raises(OffloadedWeightUseError, match=r"block\.proj\.weight .*preload_module_classes"):
        use(_placeholder(), torch.ones(2, 4))


def test_a_placeholder_keeps_its_kind_and_metadata():
    w = _placeholder()
    assert isinstance(w, Tagged) and isinstance(w, nn.Parameter) and isinstance(w, OffloadedPlaceholder)
    assert (w.tag, w.shape, w.dtype, w.device.type, w.requires_grad) == ("q", (4, 4), torch.float32, "meta", True)
    assert w.to(torch.bfloat16).dtype == torch.bfloat16 and w.size(0) == 4 and w.is_floating_point()
    assert isinstance(w.detach().T, OffloadedPlaceholder)  # derived placeholders refuse too


def test_an_offloaded_weight_read_where_dispatch_cannot_see_raises(tmp_path):
    """A read through getattr escapes the code reading of direct_reads: the forward fails, naming the weight,
    where it returned a matmul with uninitialised memory."""

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.gate = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x) @ getattr(self, "proj").weight  # noqa: B009 - hidden from the code reading

    model = nn.Sequential(nn.Linear(4, 4), Hidden())
    dispatch_model(model, {"0": "cpu", "1": "disk"}, offload_dir=tmp_path)
    with pytest.raises(OffloadedWeightUseError, match=r"1\.proj\.weight"), torch.no_grad():
        model(torch.ones(2, 4))
    dispatch_model(model, {"0": "cpu", "1": "disk"}, offload_dir=tmp_path, preload_module_classes=["Hidden"])
    with torch.no_grad():
        model(torch.ones(2, 4))  # the advice works
