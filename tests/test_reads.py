"""direct_reads: the weights a module's forward reads from its submodules without calling them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_bigmodel.model.reads import direct_reads


class ReadsChildWeight(nn.Module):
    """Computes with a child's weight (DeBERTa-v2's encoder, Mamba's mixer do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.table = nn.Embedding(8, 4)

    def forward(self, x):
        return self.proj(x) + self.relative().sum()

    def relative(self):
        return self.table.weight.T  # through a method of its own


class LooksOnly(nn.Module):
    """Looks at a child's weight's metadata only, or checks its type: nothing to fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if isinstance(self.proj.weight, torch.Tensor) and x.dtype != self.proj.weight.dtype:
            x = x.to(self.proj.weight.dtype)
        assert self.proj.weight.shape[0] == self.proj.weight.size(1)
        return self.proj(x)


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        raise NotImplementedError("called through map()")

    def map(self, x):
        return self.inner(x) + self.bias  # its own bias, but its hook never fires


class CallsAMethod(nn.Module):
    """Calls a child's method other than forward (JetMoE's attention calls ``experts.map``)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()

    def forward(self, x):
        return self.experts.map(x)


class WithProperty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    @property
    def kernel(self):
        return self.inner.weight * 2

    def forward(self, x):
        return F.linear(x, self.kernel)


def test_multihead_attention_reads_its_out_proj():
    assert direct_reads(nn.MultiheadAttention(4, 2)) == {"": ["out_proj.weight", "out_proj.bias"]}


def test_a_read_through_the_module_s_own_method_is_found():
    assert direct_reads(ReadsChildWeight()) == {"": ["table.weight"]}


def test_metadata_and_type_checks_are_not_reads():
    assert direct_reads(LooksOnly()) == {}


def test_a_child_method_other_than_forward_reads_the_child_s_own_tensors():
    assert direct_reads(CallsAMethod()) == {"": ["experts.bias"]}


def test_a_property_is_followed():
    assert direct_reads(WithProperty()) == {"": ["inner.weight"]}


def test_nested_readers_list_a_tensor_under_the_outermost():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = ReadsChildWeight()

        def forward(self, x):
            return self.block(x) * self.block.table.weight.mean()

    assert direct_reads(Outer()) == {"": ["block.table.weight"]}
    assert direct_reads(nn.Sequential(ReadsChildWeight())) == {"0": ["0.table.weight"]}


def test_layers_that_call_their_children_read_nothing_directly():
    assert direct_reads(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Sequential(nn.Linear(4, 4)))) == {}


def test_torch_s_fused_encoder_layer_reads_its_children():
    """TransformerEncoderLayer's fast path hands its children's weights to one fused kernel."""
    reads = direct_reads(nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8)))
    assert set(reads) == {"0"}
    assert {"0.self_attn.in_proj_weight", "0.self_attn.out_proj.weight", "0.linear1.weight"} <= set(reads["0"])


def test_code_that_cannot_be_read_reads_nothing():
    namespace: dict[str, object] = {"nn": nn}
    exec("class Hidden(nn.Module):\n def __init__(s):\n  super().__init__(); s.p = nn.Linear(2, 2)\n"
         " def forward(s, x):\n  return x @ s.p.weight\n", namespace)
    assert direct_reads(namespace["Hidden"]()) == {}  # type: ignore[operator]


def test_the_known_cases_in_transformers_are_found():
    """The issue's list: DeBERTa-v2's rel_embeddings, SigLIP's nn.MultiheadAttention, Mamba's dt_proj, JetMoE."""
    pytest.importorskip("transformers")
    from sweep_models import ARCHITECTURES, build

    archs = {arch.id: arch for arch in ARCHITECTURES}
    expected = {
        "deberta-v2": ("", "encoder.rel_embeddings.weight"),
        "siglip": ("vision_model.head.attention", "vision_model.head.attention.out_proj.weight"),
        "mamba": ("backbone.layers.0.mixer", "backbone.layers.0.mixer.dt_proj.weight"),
        "jetmoe": ("model.layers.0.self_attention", "model.layers.0.self_attention.experts.bias"),
    }
    for arch_id, (reader, tensor) in expected.items():
        reads = direct_reads(build(archs[arch_id]))
        assert tensor in reads.get(reader, []), (arch_id, reads)


def test_a_llama_reads_nothing_directly():
    """The common case: every weight comes with its own module's call (no unit grows)."""
    pytest.importorskip("transformers")
    from sweep_models import ARCHITECTURES, build

    assert direct_reads(build(next(a for a in ARCHITECTURES if a.id == "llama"))) == {}
