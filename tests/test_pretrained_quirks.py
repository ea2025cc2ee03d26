"""Module quirks the sweep found, one test each: what ``from_pretrained`` does, and ``load_pretrained_dispatched`` too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sweep_models import ARCHITECTURES, INPUTS, Arch, build

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


#: (architecture, the module put on disk, the module whose forward reads its weights without calling it)
DIRECT_READS = [
    ("deberta-v2", "encoder.rel_embeddings", ""),  # DebertaV2Model reads encoder.rel_embeddings.weight
    ("siglip", "vision_model.head.attention.out_proj", "vision_model.head.attention"),  # nn.MultiheadAttention
    ("jetmoe", "model.layers.1.self_attention.experts", "model.layers.1.self_attention"),  # experts.map(...)
]


@pytest.mark.parametrize(("arch_id", "on_disk", "reader"), DIRECT_READS, ids=[case[0] for case in DIRECT_READS])
def test_weights_read_without_calling_their_module(tmp_path, arch_id, on_disk, reader):
    """Offloaded, a weight whose module is never called (its forward never runs) would stay a placeholder:
    the module that reads it fetches it for its whole forward instead, found from its code, and the outputs
    are transformers'. No ``preload_module_classes`` needed."""
    arch = ARCHS[arch_id]
    folder = save(arch, tmp_path / arch_id)
    reference = getattr(transformers, arch.cls).from_pretrained(folder)
    model = load_pretrained_dispatched(folder, device_map={"": "cpu", on_disk: "disk"})

    assert model.hf_device_map[on_disk] == "disk"
    hooked = model.get_submodule(reader)._hf_hook
    hooks = getattr(hooked, "hooks", [hooked])
    fetched = [name for hook in hooks for name in getattr(hook, "tensor_names", None) or ()]
    assert fetched and all(f"{reader}.{name}".lstrip(".").startswith(on_disk) for name in fetched), fetched
    inputs = INPUTS[arch.inputs](reference.config)
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key


def test_router_recasting_its_own_weights_when_offloaded(tmp_path):
    """switch_transformers' router runs ``self.classifier.to(torch.float32)`` in its forward. Offloaded, that
    recasts the placeholder: the hook then delivers the weights in float32, as from_pretrained's classifier
    holds them after the same cast (it failed with a dtype mismatch)."""
    arch = ARCHS["switch-transformers"]
    folder = save(arch, tmp_path / "switch")
    reference = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    routers = [name for name, module in reference.named_modules() if name.endswith("mlp.router")]
    model = load_pretrained_dispatched(folder, torch_dtype=torch.bfloat16,
                                       device_map={"": "cpu", **dict.fromkeys(routers, "disk")})

    assert routers and all(model.hf_device_map[name] == "disk" for name in routers)
    inputs = INPUTS[arch.inputs](reference.config)
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    assert reference.get_submodule(routers[0]).classifier.weight.dtype == torch.float32  # its own cast
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False),
                       reference.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False))
