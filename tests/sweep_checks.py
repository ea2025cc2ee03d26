"""What the sweeps share: the load variants, which run, one save per model and layout, and exact comparisons.

CI runs each model in one variant, the variants taken in turn down the list (every model is loaded, every
variant is tried on a third of them), plus every variant a model is expected to fail in, so a fixed gap
flips its strict xfail. ``HF_BIGMODEL_FULL_SWEEP=1`` runs every model in every variant (three times the
cases: about four minutes of one core for both sweeps)::

    HF_BIGMODEL_FULL_SWEEP=1 python -m pytest -q tests/test_sweep_transformers.py tests/test_sweep_diffusers.py
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.runtime.model_device import own_class

__all__ = ["FULL_SWEEP", "VARIANTS", "Saved", "assert_same", "assert_same_outputs", "cases", "flat_tensors",
           "load_as_reference", "run", "state", "transient_buffers"]

#: name: (which save, dtype, part on disk)
VARIANTS: dict[str, tuple[str, torch.dtype | None, bool]] = {
    "ram": ("single", None, False),
    "disk": ("sharded", None, True),
    "bf16+disk": ("single", torch.bfloat16, True),
}

#: Every model in every variant (``HF_BIGMODEL_FULL_SWEEP=1``), not CI's one variant per model.
FULL_SWEEP = os.environ.get("HF_BIGMODEL_FULL_SWEEP", "0") not in ("", "0")


def cases(models: Sequence[Any]) -> list[Any]:
    """The (model, variant) test cases: all of them with :data:`FULL_SWEEP`, else CI's share (above).

    ``models`` have an ``id`` and ``xfail_reason(variant)``; an expected failure is a strict xfail.
    """
    names = list(VARIANTS)
    params = []
    for index, model in enumerate(models):
        for variant in names:
            reason = model.xfail_reason(variant)
            if FULL_SWEEP or reason is not None or variant == names[index % len(names)]:
                marks = [] if reason is None else [pytest.mark.xfail(strict=True, reason=reason)]
                params.append(pytest.param(model, variant, id=f"{model.id}-{variant}", marks=marks))
    return params


class Saved:
    """Each model saved as one file or sharded (``shard_size``), each layout on its first use."""

    def __init__(self, root: Path, build: Callable[[Any], torch.nn.Module], shard_size: str) -> None:
        self.root, self.build, self.shard_size = root, build, shard_size
        self.folders: dict[tuple[str, str], Path] = {}

    def folder(self, arch: Any, layout: str) -> Path:
        """The folder of ``arch`` (anything with an ``id``) saved as ``layout``: ``"single"`` or ``"sharded"``."""
        if (arch.id, layout) not in self.folders:
            path = self.root / arch.id / layout
            self.build(arch).save_pretrained(path, max_shard_size=self.shard_size if layout == "sharded" else "1GB")
            self.folders[arch.id, layout] = path
        return self.folders[arch.id, layout]


def load_as_reference(folder: Path, reference: torch.nn.Module, variant: str, cpu_share: float) -> torch.nn.Module:
    """``load_pretrained_dispatched`` of ``folder`` as ``variant`` says, checked against ``reference`` (the
    library's own load of the same folder in the same dtype): class, eval mode, devices, tensors, buffers.

    With part on disk the CPU budget is ``cpu_share`` of the loaded model.
    """
    from hf_bigmodel import compute_module_sizes, load_pretrained_dispatched

    _, dtype, on_disk = VARIANTS[variant]
    budget = {"cpu": int(compute_module_sizes(reference)[""] * cpu_share)}
    model = load_pretrained_dispatched(folder, torch_dtype=dtype, max_memory=budget if on_disk else None)

    assert own_class(model) is type(reference) and not model.training
    stored = set(model.hf_device_map.values())
    assert stored == ({"cpu", "disk"} if on_disk else {"cpu"}), model.hf_device_map
    assert_same(state(model), state(reference), "tensor")
    assert_same(transient_buffers(model), transient_buffers(reference), "non-persistent buffer")
    return model


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
    elif hasattr(output, "to_tuple"):  # diffusers' BaseOutput is a dict subclass, others are dataclasses
        yield from flat_tensors(output.to_tuple(), path)


def run(model: torch.nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(flat_tensors(model(**inputs)))


def assert_same(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], what: str) -> None:
    """The same names in the same order, and equal dtypes and values (``rtol=0, atol=0``)."""
    assert list(ours) == list(theirs), f"{what}: names differ"
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, f"{what} {name}: {ours[name].dtype} != {tensor.dtype}"
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_same_outputs(model: torch.nn.Module, reference: torch.nn.Module, inputs: Mapping[str, Any]) -> None:
    """Equal outputs; where the library's own model fails (DeBERTa's float32 ``q_bias`` in bfloat16, a tiny
    VAE's float32 latents in a bfloat16 decoder), ``model`` fails the same way."""
    try:
        expected = run(reference, inputs)
    except RuntimeError as err:
        with pytest.raises(type(err), match=re.escape(str(err))):
            run(model, inputs)
        return
    assert_same(run(model, inputs), expected, "output")
