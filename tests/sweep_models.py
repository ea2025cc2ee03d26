"""The transformers architectures of the sweep (``test_sweep_transformers.py``), one line each.

An :class:`Arch` names a transformers class, the inputs it takes, and the config entries that differ from
the shared tiny sizes (:data:`TINY`, applied to every entry the config has, sub-configs included). Adding
an architecture is one line in :data:`ARCHITECTURES`::

    Arch("gptj", "GPTJForCausalLM", config={"rotary_dim": 4}),

Each model is built from transformers' own class with a fixed seed, a few thousand parameters big.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "INPUTS", "Arch", "build", "tiny_config"]

SEED = 0
#: Sizes every config gets where it has the entry (a nested config too), unless its line says otherwise.
TINY: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 64,
    "d_model": 16, "d_ff": 32, "d_kv": 8, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2,
    "n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 32, "n_positions": 64,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "n_routed_experts": 4, "n_shared_experts": 1,
    "image_size": 32, "patch_size": 8, "num_channels": 3, "projection_dim": 16,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0,
}


@dataclass(frozen=True)
class Arch:
    """One architecture: the test id, the transformers class, its inputs (a key of :data:`INPUTS`)."""

    id: str
    cls: str
    inputs: str = "text"
    config: Mapping[str, Any] = field(default_factory=dict)
    #: Why it is expected to fail today, in every variant or by variant (``xfail(strict=True)``: the
    #: test flips when fixed).
    xfail: str | Mapping[str, str] | None = None
    #: The CPU budget with part on disk, as a share of the loaded model (the rest goes to disk).
    cpu_share: float = 0.75

    def xfail_reason(self, variant: str) -> str | None:
        return self.xfail.get(variant) if isinstance(self.xfail, Mapping) else self.xfail


ARCHITECTURES: list[Arch] = [
    # -- dense decoders ----------------------------------------------------------------------------
    Arch("llama", "LlamaForCausalLM"),
    Arch("mistral", "MistralForCausalLM"),
    Arch("qwen2", "Qwen2ForCausalLM"),
    Arch("qwen3", "Qwen3ForCausalLM"),
    Arch("gemma", "GemmaForCausalLM"),
    Arch("gemma2", "Gemma2ForCausalLM"),
    Arch("gemma3-text", "Gemma3ForCausalLM"),
    Arch("phi", "PhiForCausalLM"),
    Arch("phi3", "Phi3ForCausalLM"),
    Arch("gpt2", "GPT2LMHeadModel"),
    Arch("gpt-neo", "GPTNeoForCausalLM", config={"attention_types": [[["global", "local"], 1]], "window_size": 4}),
    Arch("gpt-neox", "GPTNeoXForCausalLM"),
    Arch("gptj", "GPTJForCausalLM", config={"rotary_dim": 4}),
    Arch("codegen", "CodeGenForCausalLM", config={"rotary_dim": 4}),
    Arch("gpt-bigcode", "GPTBigCodeForCausalLM"),
    Arch("opt", "OPTForCausalLM", config={"word_embed_proj_dim": 16, "ffn_dim": 32}),
    Arch("bloom", "BloomForCausalLM"),
    Arch("falcon", "FalconForCausalLM", config={"num_kv_heads": 1}),
    Arch("mpt", "MptForCausalLM"),
    Arch("stablelm", "StableLmForCausalLM"),
    Arch("starcoder2", "Starcoder2ForCausalLM"),
    Arch("olmo", "OlmoForCausalLM"),
    Arch("olmo2", "Olmo2ForCausalLM"),
    Arch("cohere", "CohereForCausalLM"),
    Arch("persimmon", "PersimmonForCausalLM"),
    Arch("xglm", "XGLMForCausalLM", config={"ffn_dim": 32}),
    Arch("biogpt", "BioGptForCausalLM"),
    Arch("granite", "GraniteForCausalLM"),
    Arch("helium", "HeliumForCausalLM"),
    Arch("smollm3", "SmolLM3ForCausalLM"),
    Arch("glm", "GlmForCausalLM"),
    Arch("mamba", "MambaForCausalLM", config={"state_size": 4, "time_step_rank": 2}),
    # -- mixture-of-experts decoders ---------------------------------------------------------------
    Arch("mixtral", "MixtralForCausalLM"),
    Arch("qwen2-moe", "Qwen2MoeForCausalLM"),
    Arch("qwen3-moe", "Qwen3MoeForCausalLM"),
    Arch("olmoe", "OlmoeForCausalLM"),
    Arch("phimoe", "PhimoeForCausalLM"),
    Arch("granite-moe", "GraniteMoeForCausalLM"),
    Arch("jetmoe", "JetMoeForCausalLM"),
    Arch("gpt-oss", "GptOssForCausalLM"),
    Arch("deepseek-v3", "DeepseekV3ForCausalLM", config={
        "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
        "head_dim": 4, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}),
    # -- encoder-decoders --------------------------------------------------------------------------
    Arch("t5", "T5ForConditionalGeneration", "seq2seq", config={"decoder_start_token_id": 0}),
    Arch("bart", "BartForConditionalGeneration", "seq2seq"),
    Arch("mbart", "MBartForConditionalGeneration", "seq2seq"),
    Arch("pegasus", "PegasusForConditionalGeneration", "seq2seq"),
    Arch("marian", "MarianMTModel", "seq2seq"),
    Arch("m2m100", "M2M100ForConditionalGeneration", "seq2seq"),
    Arch("mt5", "MT5ForConditionalGeneration", "seq2seq", config={"decoder_start_token_id": 0}),
    Arch("umt5", "UMT5ForConditionalGeneration", "seq2seq", config={"decoder_start_token_id": 0}),
    Arch("longt5", "LongT5ForConditionalGeneration", "seq2seq", config={"decoder_start_token_id": 0}),
    Arch("blenderbot", "BlenderbotForConditionalGeneration", "seq2seq"),
    Arch("plbart", "PLBartForConditionalGeneration", "seq2seq"),
    Arch("switch-transformers", "SwitchTransformersForConditionalGeneration", "seq2seq",
         config={"num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1}),
    # -- encoders ----------------------------------------------------------------------------------
    Arch("bert", "BertModel"),
    Arch("roberta", "RobertaModel"),
    Arch("distilbert", "DistilBertModel", config={"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32}),
    Arch("albert", "AlbertModel", config={"embedding_size": 8}),
    Arch("electra", "ElectraModel", config={"embedding_size": 8}),
    Arch("deberta", "DebertaModel"),
    Arch("deberta-v2", "DebertaV2Model", config={"relative_attention": True, "position_buckets": 8}),
    Arch("xlm-roberta", "XLMRobertaModel"),
    Arch("mpnet", "MPNetModel"),
    Arch("roformer", "RoFormerModel", config={"embedding_size": 16}),
    Arch("ernie", "ErnieModel"),
    Arch("esm", "EsmModel", config={"vocab_size": 33}),
    Arch("modernbert", "ModernBertModel", config={"global_attn_every_n_layers": 2, "local_attention": 4}),
    # -- vision ------------------------------------------------------------------------------------
    Arch("vit", "ViTModel", "image"),
    Arch("deit", "DeiTModel", "image"),
    Arch("dinov2", "Dinov2Model", "image"),
    Arch("convnext", "ConvNextModel", "image", cpu_share=0.85,
         config={"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}),
    Arch("resnet", "ResNetModel", "image", cpu_share=0.85,
         config={"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8}),
    Arch("swin", "SwinModel", "image", config={"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2],
                                              "window_size": 2, "patch_size": 4}),
    Arch("beit", "BeitModel", "image"),
    Arch("regnet", "RegNetModel", "image", cpu_share=0.85,
         config={"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8, "groups_width": 4}),
    Arch("convnextv2", "ConvNextV2Model", "image", cpu_share=0.85,
         config={"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}),
    # -- multimodal --------------------------------------------------------------------------------
    Arch("clip", "CLIPModel", "text+image"),
    Arch("siglip", "SiglipModel", "text+image"),
    Arch("llava", "LlavaForConditionalGeneration", "llava", config={"image_token_index": 100}),
    Arch("blip", "BlipModel", "text+image"),
    Arch("paligemma", "PaliGemmaForConditionalGeneration", "llava", config={"image_token_index": 100}),
    Arch("wav2vec2", "Wav2Vec2Model", "waveform", config={
        "conv_dim": [8, 8], "conv_stride": [5, 2], "conv_kernel": [10, 3], "num_feat_extract_layers": 2,
        "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2}),
    Arch("whisper", "WhisperForConditionalGeneration", "audio",
         config={"num_mel_bins": 8, "max_source_positions": 8, "max_target_positions": 16}),
]


# -- building ---------------------------------------------------------------------------------------
def _settable(config_cls: type, key: str) -> bool:
    """Whether ``key`` is a plain config entry (not a read-only property such as Falcon's ``head_dim``)."""
    attr = inspect.getattr_static(config_cls, key, None)
    return not (isinstance(attr, property) and attr.fset is None)


def tiny_config(config_cls: type, overrides: Mapping[str, Any] | None = None) -> Any:
    """``config_cls`` with the :data:`TINY` sizes it has, sub-configs shrunk too, then ``overrides``."""
    overrides = dict(overrides or {})
    default = config_cls()
    aliases = getattr(config_cls, "attribute_map", None) or {}  # e.g. Swin: num_attention_heads -> num_heads
    values = {k: v for k, v in TINY.items()
              if hasattr(default, k) and _settable(config_cls, k) and aliases.get(k) not in overrides}
    for name in getattr(config_cls, "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            values[name] = tiny_config(type(sub), overrides.pop(name, None)).to_dict()
    values.update(overrides)
    return config_cls(**values)


def build(arch: Arch) -> torch.nn.Module:
    """The tiny model of ``arch``, built with seed :data:`SEED`, in eval mode."""
    import transformers

    cls = getattr(transformers, arch.cls)
    config = tiny_config(cls.config_class, arch.config)
    torch.manual_seed(SEED)
    return cls(config).eval()


# -- inputs -----------------------------------------------------------------------------------------
PROMPT = [1, 7, 12, 30, 4, 9]


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor([values])


def _pixels(config: Any) -> torch.Tensor:
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", 32)
    size = size if isinstance(size, int) else size[0]
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(1, getattr(vision, "num_channels", 3), size, size, generator=generator)  # [B, C, H, W]


def _llava(config: Any) -> dict[str, torch.Tensor]:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return {"input_ids": _ids([1, *[config.image_token_index] * patches, *PROMPT[1:]]), "pixel_values": _pixels(config)}


def _audio(config: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    features = torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
    return {"input_features": features, "decoder_input_ids": _ids([config.decoder_start_token_id, 5, 6])}


#: Input kind -> the forward's inputs for a config. Generation drops ``decoder_input_ids``.
INPUTS: dict[str, Callable[[Any], dict[str, torch.Tensor]]] = {
    "text": lambda config: {"input_ids": _ids(PROMPT)},
    "seq2seq": lambda config: {"input_ids": _ids(PROMPT), "decoder_input_ids": _ids([0, 5, 6])},
    "image": lambda config: {"pixel_values": _pixels(config)},
    "text+image": lambda config: {"input_ids": _ids(PROMPT), "pixel_values": _pixels(config)},
    "llava": _llava,
    "waveform": lambda config: {"input_values": torch.randn(1, 400, generator=torch.Generator().manual_seed(SEED))},
    "audio": _audio,
}
