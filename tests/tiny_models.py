"""Tiny, seeded models saved with the libraries' own ``save_pretrained``, for tests (each well under 1 MB).

Every ``save_tiny_*`` writes into ``directory`` and returns ``SavedModel(path, model)``: the folder and
the in-memory reference model it was saved from (in eval mode), so tests compare numerically::

    path, ref = save_tiny_llama(tmp_path / "llama", sharded=True)

``sharded=True`` splits the weights with ``max_shard_size`` (several shards plus an index);
``safe_serialization=False`` rewrites the same tensors as torch ``pytorch_model*.bin`` files (with
``pytorch_model.bin.index.json`` when sharded), since transformers 5 writes only safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "TINY_VOCAB",
    "SavedModel",
    "save_tiny_bert",
    "save_tiny_gpt2",
    "save_tiny_llama",
    "save_tiny_sd_components",
    "save_tiny_t5",
    "save_tiny_tokenizer",
    "write_junk_files",
]

SEED = 0
TINY_VOCAB = 128
SHARD_SIZE = "8KB"  # tiny models hold ~35 KB of float32 weights, so this gives a handful of shards
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
_TEXT = (
    "the a an of to and in is it that on for with as was be by at this are from or not but "
    "have hello world big model small tiny cpu gpu disk memory layer weight load run fast slow "
    "red blue green cat dog bird fish tree river sky sun moon star one two three four five six "
    "seven eight nine ten "
)
_WORDS = _TEXT.split()  # ids 4.., then fillers w<id> up to TINY_VOCAB


class SavedModel(NamedTuple):
    path: Path
    model: Any


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _finish(
    model: Any,
    directory: str | Path,
    *,
    sharded: bool,
    max_shard_size: int | str,
    safe_serialization: bool,
    dtype: torch.dtype | None,
) -> SavedModel:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    model.save_pretrained(path, max_shard_size=max_shard_size if sharded else "50GB")
    if not safe_serialization:
        _to_torch_files(path, prefix="model", torch_prefix="pytorch_model")
    return SavedModel(path, model)


def _to_torch_files(path: Path, *, prefix: str, torch_prefix: str) -> None:
    """Rewrite ``{prefix}*.safetensors`` (and its index) as ``{torch_prefix}*.bin`` with the same tensors."""
    from safetensors.torch import load_file

    renames: dict[str, str] = {}
    for st in sorted(path.glob(f"{prefix}*.safetensors")):
        name = torch_prefix + st.name[len(prefix) : -len(".safetensors")] + ".bin"
        torch.save(load_file(st), path / name)
        renames[st.name] = name
        st.unlink()
    index = path / f"{prefix}.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        (path / f"{torch_prefix}.bin.index.json").write_text(json.dumps(data, indent=2))
        index.unlink()


def save_tiny_tokenizer(directory: str | Path) -> Path:
    """A word-level tokenizer over ~100 common words padded to 128 ids saved as ``tokenizer.json`` & co.

    Unknown words map to ``<unk>``; ``<pad>``/``<s>``/``</s>`` are ids 0/1/2 like the tiny configs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _SPECIALS + _WORDS
    words += [f"w{i}" for i in range(len(words), TINY_VOCAB)]  # every id decodes to a word
    vocab = {tok: i for i, tok in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_tiny_llama(
    directory: str | Path,
    *,
    sharded: bool = False,
    max_shard_size: int | str = SHARD_SIZE,
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
    seed: int = SEED,
    layers: int = 2,
) -> SavedModel:
    """A 2-layer (or ``layers``) ``LlamaForCausalLM`` (hidden 16, GQA 2 heads / 1 kv head, untied head, vocab 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    _seeded(seed)
    saved = _finish(
        LlamaForCausalLM(config),
        directory,
        sharded=sharded,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        dtype=dtype,
    )
    if with_tokenizer:
        save_tiny_tokenizer(saved.path)
    return saved


def save_tiny_gpt2(
    directory: str | Path,
    *,
    sharded: bool = False,
    max_shard_size: int | str = SHARD_SIZE,
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
    seed: int = SEED,
    layers: int = 2,
) -> SavedModel:
    """A 2-layer (or ``layers``) ``GPT2LMHeadModel`` whose ``lm_head`` is tied to ``transformer.wte`` (saved once)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_VOCAB,
        n_positions=64,
        n_embd=16,
        n_layer=layers,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    _seeded(seed)
    saved = _finish(
        GPT2LMHeadModel(config),
        directory,
        sharded=sharded,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        dtype=dtype,
    )
    if with_tokenizer:
        save_tiny_tokenizer(saved.path)
    return saved


def save_tiny_t5(
    directory: str | Path,
    *,
    sharded: bool = False,
    max_shard_size: int | str = SHARD_SIZE,
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = SEED,
) -> SavedModel:
    """A 2+2-layer ``T5ForConditionalGeneration`` (d_model 16, relative attention, tied embeddings)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=TINY_VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
    )
    _seeded(seed)
    return _finish(
        T5ForConditionalGeneration(config),
        directory,
        sharded=sharded,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        dtype=dtype,
    )


def save_tiny_bert(
    directory: str | Path,
    *,
    sharded: bool = False,
    max_shard_size: int | str = SHARD_SIZE,
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = SEED,
) -> SavedModel:
    """A 2-layer ``BertModel`` (hidden 16, 2 heads, with pooler)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=0,
    )
    _seeded(seed)
    return _finish(
        BertModel(config),
        directory,
        sharded=sharded,
        max_shard_size=max_shard_size,
        safe_serialization=safe_serialization,
        dtype=dtype,
    )


class SavedPipeline(NamedTuple):
    path: Path
    components: dict[str, Any]


def save_tiny_sd_components(
    directory: str | Path,
    *,
    sharded: bool = False,
    max_shard_size: int | str = "16KB",
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
    seed: int = SEED,
) -> SavedPipeline:
    """A diffusers pipeline-style folder: ``model_index.json``, ``unet/``, ``vae/`` and ``scheduler/``.

    ``unet`` is a tiny ``UNet2DConditionModel`` (channels 8/16, cross-attention dim 8) and ``vae`` a
    tiny ``AutoencoderKL``; each folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``
    (or ``.bin`` with ``safe_serialization=False``). There is no text encoder: the folder is for
    component loading, not for ``DiffusionPipeline.from_pretrained``.
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
    )
    components = {"unet": unet, "vae": vae}
    for name, model in components.items():
        if dtype is not None:
            model.to(dtype)
        model.eval()
        model.save_pretrained(
            path / name,
            safe_serialization=safe_serialization,
            max_shard_size=max_shard_size if sharded else "10GB",
        )
    DDIMScheduler(num_train_timesteps=100).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return SavedPipeline(path, components)


#: Files other frameworks (or nobody) need: a resolver must never fetch them for a PyTorch load.
JUNK_FILES = (
    "tf_model.h5",
    "flax_model.msgpack",
    "model.onnx",
    "README.md",
    "rust_model.ot",
    "training_args.bin",
)


def write_junk_files(directory: str | Path, names: tuple[str, ...] = JUNK_FILES) -> list[str]:
    """Drop unrelated files (TF/Flax/ONNX weights, a README...) into ``directory``; return their names."""
    path = Path(directory)
    for i, name in enumerate(names):
        (path / name).write_bytes(f"not for pytorch #{i} ".encode() * 64)
    return list(names)


SMALL_LLAMA_LAYERS = 4


class ResidualBlock(torch.nn.Module):
    """``x + Linear(x)`` without bias: 16 KiB of float32 at width 64, the no-split block of the planning toys."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


def small_llama_config() -> Any:
    """A 4-layer Llama (hidden 64, vocab 256): big enough for several prefetch groups, still tiny."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=SMALL_LLAMA_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def greedy(ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments for exactly ``new_tokens`` greedy tokens after the prompts ``ids``."""
    return {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens, "pad_token_id": 0}


def assert_same_outputs(model: Any, ref: Any, ids: torch.Tensor, new_tokens: int) -> None:
    """``model`` gives ``ref``'s logits for ``ids`` and its ``new_tokens`` greedy tokens, exactly."""
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.equal(model.generate(ids, **greedy(ids, new_tokens)), ref.generate(ids, **greedy(ids, new_tokens)))


def save_small_bf16_llama(directory: str | Path, *, seed: int = 0) -> SavedModel:
    """:func:`small_llama_config` with bf16 weights, saved as ~60 KB safetensors shards.

    Buffers (rotary ``inv_freq``) stay float32, as loading leaves them.
    """
    from transformers import LlamaForCausalLM

    _seeded(seed)
    ref = LlamaForCausalLM(small_llama_config()).eval()
    for param in ref.parameters():
        param.data = param.data.to(torch.bfloat16)
    ref.save_pretrained(directory, max_shard_size="60KB")
    return SavedModel(Path(directory), ref)



def record_llama_inits(monkeypatch: Any) -> list[str]:
    """Class names of the modules transformers' Llama ``_init_weights`` is called on, from now on."""
    import transformers

    initialised: list[str] = []
    original = transformers.LlamaPreTrainedModel._init_weights

    def spy(self: Any, module: Any) -> Any:
        initialised.append(type(module).__name__)
        return original(self, module)

    monkeypatch.setattr(transformers.LlamaPreTrainedModel, "_init_weights", spy)
    return initialised
