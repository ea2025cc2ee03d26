import torch
from core_models import TinyLM
from torch import nn

from hf_bigmodel import init_empty_weights, init_on_device


def test_init_empty_weights_puts_parameters_on_meta_and_keeps_buffers():
    with init_empty_weights():
        model = TinyLM()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert model.blocks[0].offset[0].item() == 0.5  # computed in __init__, still real
    assert model.head.weight is model.embed.weight  # ties survive


def test_init_empty_weights_include_buffers():
    with init_empty_weights(include_buffers=True):
        model = TinyLM()
        scratch = torch.ones(3)
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers(), scratch])


def test_huge_model_costs_nothing():
    with init_empty_weights():
        big = nn.Sequential(*[nn.Linear(65536, 65536) for _ in range(8)])  # 137 GB in fp32
    assert sum(p.numel() for p in big.parameters()) > 3 * 10**10


def test_patches_are_undone_even_on_error():
    original = nn.Module.register_parameter
    try:
        with init_empty_weights(include_buffers=True):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert nn.Module.register_parameter is original
    assert nn.Linear(2, 2).weight.device.type == "cpu"
    assert torch.ones(1).device.type == "cpu"


def test_init_on_device_cpu_and_parameter_attributes():
    class Tagged(nn.Module):
        def __init__(self):
            super().__init__()
            param = nn.Parameter(torch.zeros(2), requires_grad=False)
            param.tag = "kept"
            self.p = param

    with init_on_device("meta"):
        module = Tagged()
    assert module.p.device.type == "meta"
    assert module.p.tag == "kept" and not module.p.requires_grad
    with init_on_device(torch.device("cpu")):
        layer = nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu"


def test_transformers_models_skip_init_of_all_meta_modules(monkeypatch):
    import pytest

    transformers = pytest.importorskip("transformers")
    from tiny_models import record_llama_inits, small_llama_config

    config = small_llama_config()
    initialised = record_llama_inits(monkeypatch)
    initialize = transformers.PreTrainedModel._initialize_weights
    with pytest.raises(RuntimeError, match="boom"), init_empty_weights():
        assert transformers.PreTrainedModel._initialize_weights is not initialize
        raise RuntimeError("boom")
    assert transformers.PreTrainedModel._initialize_weights is initialize  # restored, even after an error
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    assert "LlamaRotaryEmbedding" in initialised  # real buffers built in __init__: initialised as usual
    assert not {"Linear", "Embedding", "LlamaRMSNorm"} & set(initialised), initialised
    reference = transformers.LlamaForCausalLM(config)
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    initialised.clear()
    with init_on_device("cpu"):  # real tensors: transformers initialises everything
        transformers.LlamaForCausalLM(config)
    assert "Linear" in initialised
