"""Module quirks the sweep found, one test each: what ``from_pretrained`` does, and ``load_pretrained_dispatched`` too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sweep_models import ARCHITECTURES, Arch, build

from hf_bigmodel import compute_module_sizes, load_pretrained_dispatched

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {arch.id: arch for arch in ARCHITECTURES}


def save(arch: Arch, folder: Path) -> Path:
    build(arch).save_pretrained(folder)
    return folder


def test_rotary_table_computed_after_the_build_in_float32(tmp_path):
    """GPT-J builds its sinusoidal table while torch's default dtype is the load dtype (its frequencies then
    come out in bfloat16); transformers computes it again after loading, in float32. Off by up to 0.012."""
    folder = save(ARCHS["gptj"], tmp_path / "gptj")
    reference = transformers.GPTJForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = load_pretrained_dispatched(folder, torch_dtype=torch.bfloat16)

    ours, theirs = model.transformer.rotary_emb.embed_positions, reference.transformer.rotary_emb.embed_positions
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)
    prompt = torch.tensor([[1, 7, 12, 30, 4, 9]])
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, reference(prompt).logits)


def test_parameter_built_in_float32_keeps_float32_in_bfloat16(tmp_path):
    """transformers 5 loads each tensor in the dtype its parameter was built with: DeBERTa builds ``q_bias``
    with ``dtype=torch.float``, so it stays float32 when the model is loaded in bfloat16."""
    folder = save(ARCHS["deberta"], tmp_path / "deberta")
    reference = transformers.DebertaModel.from_pretrained(folder, dtype=torch.bfloat16)
    model = load_pretrained_dispatched(folder, torch_dtype=torch.bfloat16)

    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    assert dtypes == {name: t.dtype for name, t in reference.state_dict().items()}
    assert dtypes["encoder.layer.0.attention.self.q_bias"] == torch.float32
    assert dtypes["encoder.layer.0.attention.self.in_proj.weight"] == torch.bfloat16


def test_model_without_no_split_modules_keeps_its_layers_whole(tmp_path):
    """DeBERTa-v2 declares no ``_no_split_modules``; a budget that used to cut layer 0 between cpu and disk
    now keeps every layer on one device, and the outputs are transformers'."""
    folder = save(ARCHS["deberta-v2"], tmp_path / "deberta-v2")
    reference = transformers.DebertaV2Model.from_pretrained(folder)
    budget = {"cpu": int(compute_module_sizes(reference)[""] * 0.6)}
    model = load_pretrained_dispatched(folder, max_memory=budget)

    assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    inside_a_layer = [key for key in model.hf_device_map if key.startswith("encoder.layer.") and key.count(".") > 2]
    assert not inside_a_layer, model.hf_device_map
    prompt = torch.tensor([[1, 7, 12, 30, 4, 9]])
    with torch.no_grad():
        assert torch.equal(model(prompt).last_hidden_state, reference(prompt).last_hidden_state)
