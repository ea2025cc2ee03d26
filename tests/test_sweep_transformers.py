"""The sweep: ``load_pretrained_dispatched`` against transformers' own ``from_pretrained``, architecture by architecture.

Every architecture of ``sweep_models.ARCHITECTURES`` is built tiny, saved once as one file and once
sharded, then loaded three ways (:data:`VARIANTS`) and compared exactly with ``from_pretrained`` of the
same folder in the same dtype: the class, every tensor's name, dtype and value (offloaded ones as the
hooks will deliver them), the outputs on a fixed input, and greedy tokens where the model generates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sweep_models import ARCHITECTURES, INPUTS, Arch, build

from hf_bigmodel import compute_module_sizes, load_pretrained_dispatched
from hf_bigmodel.load.loading import OFFLOAD_ATTR

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD_SIZE = "8KB"  # a few thousand float32 parameters: several shards per model
#: name: (which save, dtype, part on disk)
VARIANTS: dict[str, tuple[str, torch.dtype | None, bool]] = {
    "ram": ("single", None, False),
    "disk": ("sharded", None, True),
    "bf16+disk": ("single", torch.bfloat16, True),
}


class Saved:
    """Each architecture saved once per layout (one build per architecture, on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: dict[tuple[str, str], Path] = {}

    def folder(self, arch: Arch, layout: str) -> Path:
        if (arch.id, layout) not in self.folders:
            model = build(arch)
            for kind in ("single", "sharded"):
                path = self.root / arch.id / kind
                model.save_pretrained(path, max_shard_size=SHARD_SIZE if kind == "sharded" else "1GB")
                self.folders[arch.id, kind] = path
        return self.folders[arch.id, layout]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("sweep"))


def model_inputs(arch: Arch, config: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The fixed inputs, floating-point ones (pixels, audio features) in the model's dtype."""
    inputs = INPUTS[arch.inputs](config)
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in inputs.items()}


def cases() -> list[Any]:
    params = []
    for arch in ARCHITECTURES:
        for variant in VARIANTS:
            reason = arch.xfail_reason(variant)
            marks = [] if reason is None else [pytest.mark.xfail(strict=True, reason=reason)]
            params.append(pytest.param(arch, variant, id=f"{arch.id}-{variant}", marks=marks))
    return params


# -- what is compared -------------------------------------------------------------------------------
def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict entry, offloaded ones read from the weights map the hooks stream from."""
    weights = getattr(model, OFFLOAD_ATTR, None)
    result = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            assert weights is not None and name in weights, f"{name} is on meta and nowhere else"
            tensor = weights[name]
        result[name] = tensor
    return result


def transient_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (rotary tables, masks): built by the model, never read from the checkpoint."""
    kept = set(model.state_dict())
    return {n: b for n, b in model.named_buffers() if n not in kept and b.device.type != "meta"}


def flat_tensors(output: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a model output (nested ModelOutputs, tuples, dicts), with where each sits."""
    if isinstance(output, torch.Tensor):
        yield path, output
    elif isinstance(output, Mapping):
        for key, value in output.items():
            yield from flat_tensors(value, f"{path}.{key}")
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            yield from flat_tensors(value, f"{path}[{i}]")


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(flat_tensors(model(**inputs)))


def greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    return model.generate(**prompt, max_new_tokens=3, do_sample=False)


def assert_same(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], what: str) -> None:
    assert list(ours) == list(theirs), f"{what}: names differ"
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, f"{what} {name}: {ours[name].dtype} != {tensor.dtype}"
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{what} {n}: {m}")


# -- the sweep --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "variant"), cases())
def test_loads_as_from_pretrained(saved: Saved, arch: Arch, variant: str) -> None:
    layout, dtype, on_disk = VARIANTS[variant]
    folder = saved.folder(arch, layout)
    reference = getattr(transformers, arch.cls).from_pretrained(folder, dtype=dtype)
    budget = {"cpu": int(compute_module_sizes(reference)[""] * arch.cpu_share)}

    model = load_pretrained_dispatched(folder, torch_dtype=dtype, max_memory=budget if on_disk else None)

    assert type(model) is type(reference) and not model.training
    stored = set(model.hf_device_map.values())
    assert stored == ({"cpu", "disk"} if on_disk else {"cpu"}), model.hf_device_map
    assert_same(state(model), state(reference), "tensor")
    assert_same(transient_buffers(model), transient_buffers(reference), "non-persistent buffer")
    inputs = model_inputs(arch, reference.config, dtype)
    try:
        expected = run(reference, inputs)
    except RuntimeError as err:  # e.g. DeBERTa's float32 q_bias in bfloat16: ours must fail alike
        with pytest.raises(type(err), match=re.escape(str(err))):
            run(model, inputs)
        return
    assert_same(run(model, inputs), expected, "output")
    if reference.can_generate():
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
        assert torch.equal(greedy(model, inputs), greedy(reference, inputs))
