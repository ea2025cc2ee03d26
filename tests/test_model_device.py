"""``model.device`` of a dispatched model (hf_bigmodel.runtime.model_device): the execution device, also when
the model's first weight is offloaded (transformers' ``device`` property would answer meta)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import greedy, save_tiny_llama
from torch import nn

from hf_bigmodel import (
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_pretrained_dispatched,
    remove_hook_from_submodules,
)
from hf_bigmodel.runtime import dispatch as dispatch_module

ALL_ON_DISK = {"cpu": 0}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("device") / "llama")


def test_a_model_whose_first_weight_is_offloaded_reports_its_execution_device(llama):
    model = load_pretrained_dispatched(llama.path, max_memory=ALL_ON_DISK)
    assert model.model.embed_tokens.weight.device.type == "meta"  # the idle placeholder
    assert model.device == torch.device("cpu")
    assert isinstance(model, transformers.LlamaForCausalLM) and type(model).__name__ == "LlamaForCausalLM"
    assert type(model).__module__ == transformers.LlamaForCausalLM.__module__


def test_assisted_generation_with_the_first_weight_offloaded_gives_the_models_own_tokens(llama):
    model = load_pretrained_dispatched(llama.path, max_memory=ALL_ON_DISK)
    draft = transformers.AutoModelForCausalLM.from_pretrained(llama.path).eval()
    ref = llama.model.eval()
    ids = torch.tensor([[1, 5, 9, 7]])
    with torch.no_grad():
        expected = ref.generate(ids, **greedy(ids, 6))
        assert torch.equal(model.generate(ids, assistant_model=draft, **greedy(ids, 6)), expected)


def test_removing_the_hooks_gives_back_the_models_own_class(llama):
    model = load_pretrained_dispatched(llama.path, max_memory=ALL_ON_DISK)
    remove_hook_from_submodules(model)
    assert type(model) is transformers.LlamaForCausalLM
    assert model.device == torch.device("cpu") and "_hf_bigmodel_device" not in model.__dict__


def test_a_model_whose_first_weight_is_resident_keeps_its_class(llama):
    model = load_pretrained_dispatched(llama.path, max_memory={"cpu": "1GiB"})
    assert type(model) is transformers.LlamaForCausalLM and model.device == torch.device("cpu")


def test_a_second_dispatch_records_its_device_and_keeps_one_subclass(llama):
    model = load_pretrained_dispatched(llama.path, max_memory=ALL_ON_DISK)
    first = type(model)
    dispatch_model(model, {"": "disk"})
    assert type(model) is first and model.device == torch.device("cpu")


def test_a_failed_dispatch_puts_the_class_back(llama, monkeypatch):
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(llama.model.config)

    def failing(dispatched):
        raise RuntimeError("a dispatch step failed")

    monkeypatch.setattr(dispatch_module, "_DISPATCH_STEPS", [failing])
    with pytest.raises(RuntimeError, match="dispatch step failed"):
        load_checkpoint_and_dispatch(model, llama.path, device_map={"": "disk"})
    assert type(model) is transformers.LlamaForCausalLM and "_hf_bigmodel_device" not in model.__dict__


def test_a_plain_module_gets_a_device_attribute_and_keeps_its_class(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    dispatched = dispatch_model(model, {"0": "disk", "1": "cpu"}, offload_dir=tmp_path)
    assert type(dispatched) is nn.Sequential and dispatched.device == torch.device("cpu")
