"""The sweep: ``load_pretrained_dispatched`` against transformers' own ``from_pretrained``, architecture by architecture.

Every architecture of ``sweep_models.ARCHITECTURES`` is built tiny, saved as one file and sharded, and
loaded in RAM, with part on disk and in bfloat16 (``sweep_checks.VARIANTS``; CI runs a share of these,
``HF_BIGMODEL_FULL_SWEEP=1`` all of them: see ``sweep_checks``), then compared exactly with
``from_pretrained`` of the same folder in the same dtype: the class, every tensor's name, dtype and value
(offloaded ones as the hooks will deliver them), the outputs on a fixed input, and greedy tokens where
the model generates.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sweep_checks import VARIANTS, Saved, assert_same_outputs, cases, load_as_reference
from sweep_models import ARCHITECTURES, INPUTS, Arch, build

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("sweep"), build, shard_size="8KB")  # several shards per model


def model_inputs(arch: Arch, config: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The fixed inputs, floating-point ones (pixels, audio features) in the model's dtype."""
    inputs = INPUTS[arch.inputs](config)
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in inputs.items()}



# -- what is compared -------------------------------------------------------------------------------
def greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    return model.generate(**prompt, max_new_tokens=3, do_sample=False)


# -- the sweep --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "variant"), cases(ARCHITECTURES))
def test_loads_as_from_pretrained(saved: Saved, arch: Arch, variant: str) -> None:
    layout, dtype, _ = VARIANTS[variant]
    folder = saved.folder(arch, layout)
    reference = getattr(transformers, arch.cls).from_pretrained(folder, dtype=dtype)
    model = load_as_reference(folder, reference, variant, arch.cpu_share)
    inputs = model_inputs(arch, reference.config, dtype)
    assert_same_outputs(model, reference, inputs)
    if reference.can_generate():
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
        assert torch.equal(greedy(model, inputs), greedy(reference, inputs))
