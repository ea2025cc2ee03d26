"""The diffusers sweep: ``load_pretrained_dispatched`` against diffusers' own ``from_pretrained``, model by model.

Every model of ``sweep_diffusers_models.MODELS`` is built tiny, saved once as one file and once sharded,
then loaded three ways (``sweep_checks.VARIANTS``) and compared exactly with ``from_pretrained`` of the
same folder in the same dtype: the class, every tensor's name, dtype and value, and the outputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sweep_checks import VARIANTS, Saved, assert_same, assert_same_outputs, state, transient_buffers
from sweep_diffusers_models import INPUTS, MODELS, Model, build

from hf_bigmodel import compute_module_sizes, load_pretrained_dispatched

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("sweep-diffusers"), build, shard_size="16KB")


def cases() -> list[Any]:
    params = []
    for model in MODELS:
        for variant in VARIANTS:
            reason = model.xfail_reason(variant)
            marks = [] if reason is None else [pytest.mark.xfail(strict=True, reason=reason)]
            params.append(pytest.param(model, variant, id=f"{model.id}-{variant}", marks=marks))
    return params


def model_inputs(spec: Model, dtype: torch.dtype | None) -> dict[str, Any]:
    inputs = INPUTS[spec.inputs]()
    return {k: v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


@pytest.mark.parametrize(("spec", "variant"), cases())
def test_loads_as_from_pretrained(saved: Saved, spec: Model, variant: str) -> None:
    layout, dtype, on_disk = VARIANTS[variant]
    folder = saved.folder(spec, layout)
    reference = getattr(diffusers, spec.cls).from_pretrained(folder, torch_dtype=dtype)
    budget = {"cpu": int(compute_module_sizes(reference)[""] * spec.cpu_share)}

    model = load_pretrained_dispatched(folder, torch_dtype=dtype, max_memory=budget if on_disk else None)

    assert type(model) is type(reference) and not model.training
    stored = set(model.hf_device_map.values())
    assert stored == ({"cpu", "disk"} if on_disk else {"cpu"}), model.hf_device_map
    assert_same(state(model), state(reference), "tensor")
    assert_same(transient_buffers(model), transient_buffers(reference), "non-persistent buffer")
    inputs = model_inputs(spec, dtype)
    assert_same_outputs(model, reference, inputs)
