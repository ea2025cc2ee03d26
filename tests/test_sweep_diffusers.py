"""The diffusers sweep: ``load_pretrained_dispatched`` against diffusers' own ``from_pretrained``, model by model.

Every model of ``sweep_diffusers_models.MODELS`` is built tiny, saved as one file and sharded, and loaded
in RAM, with part on disk and in bfloat16 (``sweep_checks.VARIANTS``; CI runs a share of these,
``HF_BIGMODEL_FULL_SWEEP=1`` all of them: see ``sweep_checks``), then compared exactly with
``from_pretrained`` of the same folder in the same dtype: the class, every tensor's name, dtype and value,
and the outputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sweep_checks import VARIANTS, Saved, assert_same_outputs, cases, load_as_reference
from sweep_diffusers_models import INPUTS, MODELS, Model, build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("sweep-diffusers"), build, shard_size="16KB")


def model_inputs(spec: Model, dtype: torch.dtype | None) -> dict[str, Any]:
    inputs = INPUTS[spec.inputs]()
    return {k: v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


@pytest.mark.parametrize(("spec", "variant"), cases(MODELS))
def test_loads_as_from_pretrained(saved: Saved, spec: Model, variant: str) -> None:
    layout, dtype, _ = VARIANTS[variant]
    folder = saved.folder(spec, layout)
    reference = getattr(diffusers, spec.cls).from_pretrained(folder, torch_dtype=dtype)
    model = load_as_reference(folder, reference, variant, spec.cpu_share)
    inputs = model_inputs(spec, dtype)
    assert_same_outputs(model, reference, inputs)
