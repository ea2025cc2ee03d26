"""Loading transformers models the way ``PreTrainedModel.from_pretrained`` (transformers 5) does.

What is reproduced: the class from ``config.architectures[0]`` or an Auto class's mapping; the model
built under the load dtype as torch's default; ``dtype=None`` meaning the checkpoint's dtype (the
transformers 5 default); ``_keep_in_fp32_modules`` (float16 only) and ``_keep_in_fp32_modules_strict``
(float16 and bfloat16); ``_no_split_modules`` of every sub-model; transformers' own checkpoint key
renames (``LayerNorm.gamma`` -> ``LayerNorm.weight``...) and weight conversions (per-expert MoE tensors
fused: :mod:`hf_bigmodel.hf.conversions`) plus the ``base_model_prefix`` both ways;
``_keys_to_ignore_on_load_unexpected``; tied weights; missing weights initialised by the owning
model's ``_init_weights``; ``generation_config.json``; ``config.dtype`` and ``name_or_path``.

transformers itself is imported only when a model is loaded.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import (
    Advice,
    ModelClassNotFoundError,
    ModelFileNotFoundError,
    OfflineCacheMissError,
)
from ..load.conversions import Conversion
from ..model.dtypes import matches_module, target_dtype
from ..model.naming import owner, parent
from ..model.tensors import ModelTensor, model_tensors, put_tensor
from ..runtime.hooks import AlignDevicesHook, add_hook_to_module
from .conversions import TransformersKeys, conversion_targets, plan_conversions
from .hub import TRANSFORMERS_WEIGHT_NAMES, resolve_config
from .loader import DtypeArg, LoadContext, PretrainedLoader, _swap
from .quantization import check_placement, make_quantizer, quantized_sizes

__all__ = ["TransformersLoader", "hook_encoder_outputs", "no_init_of_meta_modules"]

logger = logging.getLogger(__name__)

_TRUST = Advice("Pass {} if you trust the code the repo ships (its config's auto_map).", "trust_remote_code", "True")


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


@contextmanager
def no_init_of_meta_modules() -> Iterator[None]:
    """Skip transformers' ``_init_weights`` on modules whose tensors are all on the meta device.

    ``init_empty_weights()`` enters this when transformers is imported. ``post_init`` initialises every
    module, and initialising meta tensors computes nothing but costs time (25 ms of the 38 ms it takes
    to build a 1B Llama empty). Such values come from a checkpoint; one it lacks is initialised by
    ``init_missing`` when loading with :func:`~hf_bigmodel.load_pretrained_dispatched`. Modules with real
    tensors (buffers built in ``__init__``) are initialised as usual, and so is everything where
    transformers has no ``_initialize_weights``.
    """
    module = sys.modules.get("transformers")  # not imported: no transformers model is being built
    if module is None:
        yield
        return
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__.get("_initialize_weights")
    if original is None:
        yield
        return

    def initialize(self: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if tensors and all(t.device.type == "meta" for t in tensors):
            return None
        return original(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = initialize  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original  # type: ignore[method-assign]


class TransformersLoader(PretrainedLoader):
    """The :class:`~hf_bigmodel.hf.pretrained.PretrainedLoader` for transformers models (the fallback choice).

    Example::

        model = load_pretrained_dispatched("gpt2", loader=TransformersLoader, max_memory={"cpu": "200MB"})
    """

    weight_names = TRANSFORMERS_WEIGHT_NAMES

    @classmethod
    def can_load(cls, config: Mapping[str, Any]) -> bool:
        return "_class_name" not in config and ("model_type" in config or "architectures" in config)

    # -- config and class --------------------------------------------------------------------------
    def read_config(self, ctx: LoadContext) -> Any:
        from transformers import AutoConfig

        remote = ctx.trust_remote_code and "auto_map" in ctx.raw_config
        try:
            if remote:  # the config's code lives in the repo: let transformers fetch it
                hub = {**ctx.hub_kwargs, "subfolder": ctx.subfolder or ""}  # transformers joins paths with it
                return AutoConfig.from_pretrained(ctx.name_or_path, trust_remote_code=True, **hub)
            assert ctx.config_file is not None
            return AutoConfig.from_pretrained(str(ctx.config_file.parent), local_files_only=True)
        except (ValueError, KeyError) as err:
            model_type = ctx.raw_config.get("model_type")
            if "auto_map" in ctx.raw_config and not ctx.trust_remote_code:
                advice = [_TRUST]
            else:
                advice = [Advice("Upgrade transformers, or pass {} for this model family.", "loader", "MyLoader")]
            raise ModelClassNotFoundError(
                f"transformers {_transformers_version()} cannot read config {str(ctx.config_file)!r}: "
                f"model_type {model_type!r} (architectures {ctx.raw_config.get('architectures')}) is unknown "
                f"to it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).", advice=advice,
            ) from err

    def model_class(self, ctx: LoadContext, requested: Any) -> type[nn.Module]:
        import transformers

        if requested is None:
            architectures = list(getattr(ctx.config, "architectures", None) or [])
            if architectures:
                return self._by_name(ctx, architectures[0], "config.architectures[0]")
            requested = transformers.AutoModel  # as AutoModel.from_pretrained would: the base model
        if isinstance(requested, str):
            return self._by_name(ctx, requested, "model_class=")
        if hasattr(requested, "_model_mapping"):
            return self._from_auto(ctx, requested)
        if isinstance(requested, type) and issubclass(requested, nn.Module):
            return requested
        raise TypeError(f"model_class= takes an nn.Module class, an Auto class or a class name: {requested!r}.")

    def _by_name(self, ctx: LoadContext, name: str, origin: str) -> type[nn.Module]:
        import transformers

        found = getattr(transformers, name, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
        auto_map = ctx.raw_config.get("auto_map") or {}
        reference = next((ref for ref in _auto_map_refs(auto_map) if _class_of(ref) == name), None)
        if reference is not None:
            return self._remote(ctx, reference, name)
        where = "the transformers package" + (" and the config's auto_map" if auto_map else "")
        raise ModelClassNotFoundError(
            f"{origin} of {ctx.name_or_path!r} names model class {name!r}, which transformers "
            f"{_transformers_version()} does not provide (looked in {where}; config "
            f"{str(ctx.config_file)!r}). Upgrade transformers.",
            advice=[Advice("Or pass {} with the class to build.", "model_class", "MyModel"),
                    Advice("For a custom model family, pass {}.", "loader", "MyLoader")],
        )

    def _from_auto(self, ctx: LoadContext, auto_cls: Any) -> type[nn.Module]:
        try:
            return auto_cls._model_mapping[type(ctx.config)]  # type: ignore[no-any-return]
        except KeyError:
            reference = (ctx.raw_config.get("auto_map") or {}).get(auto_cls.__name__)
            if isinstance(reference, str):
                return self._remote(ctx, reference, auto_cls.__name__)
            raise ModelClassNotFoundError(
                f"{auto_cls.__name__} has no model class for {ctx.name_or_path!r}: its config is a "
                f"{type(ctx.config).__name__} (model_type {getattr(ctx.config, 'model_type', None)!r}), "
                f"which {auto_cls.__name__} does not map in transformers {_transformers_version()}. Pick the "
                f"Auto class for this task (the config's architectures: "
                f"{getattr(ctx.config, 'architectures', None)}), or pass the model class itself."
            ) from None

    def _remote(self, ctx: LoadContext, reference: str, name: str) -> type[nn.Module]:
        if not ctx.trust_remote_code:
            raise ModelClassNotFoundError(
                f"Model class {name!r} of {ctx.name_or_path!r} is code shipped in the repo ({reference!r} in "
                "its auto_map), not part of transformers.", advice=[_TRUST],
            )
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(  # type: ignore[no-any-return]
            reference, ctx.name_or_path, cache_dir=ctx.cache_dir, token=ctx.token, revision=ctx.revision,
            local_files_only=ctx.local_files_only,
        )

    def apply_kwargs(self, ctx: LoadContext, kwargs: dict[str, Any]) -> None:
        # Before any weight is downloaded or read: an unsupported quantization method is refused here.
        ctx.cache["quantizer"] = make_quantizer(ctx.config, kwargs.pop("quantization_config", None), ctx.name_or_path)
        if "attn_implementation" in kwargs:
            ctx.config._attn_implementation = kwargs.pop("attn_implementation")
        for key in list(kwargs):
            if hasattr(ctx.config, key) and not callable(getattr(ctx.config, key)):
                setattr(ctx.config, key, kwargs.pop(key))

    def resolve_dtype(self, ctx: LoadContext, requested: DtypeArg) -> torch.dtype | None:
        if requested is None and int(_transformers_version().split(".")[0]) >= 5:
            requested = "auto"  # transformers 5 loads in the checkpoint's dtype unless told otherwise
        dtype = super().resolve_dtype(ctx, requested)
        quantizer = ctx.cache.get("quantizer")
        return dtype if quantizer is None else quantizer.update_dtype(dtype)

    # -- build and plan ----------------------------------------------------------------------------
    def build_model(self, ctx: LoadContext) -> nn.Module:
        assert ctx.model_class is not None  # set by model_class(), which always returns a class here
        model = ctx.model_class(ctx.config)  # inside init_empty_weights(), which skips all-meta inits
        quantizer = ctx.cache.get("quantizer")
        if quantizer is not None:  # quantized module classes in place of plain ones, still empty
            files = list(self.checkpoint(ctx).files) if ctx.files is not None else None  # None: planning alone
            quantizer.preprocess_model(model=model, dtype=ctx.dtype, device_map=None, checkpoint_files=files,
                                       use_kernels=False)
        return model

    def after_build(self, ctx: LoadContext) -> None:
        """Compute the non-persistent buffers again, as ``from_pretrained`` does once the weights are in.

        Buffers such as GPT-J's rotary table are computed while the model is built, when torch's default
        dtype is the load dtype: in bfloat16 they would be computed in bfloat16. transformers recomputes
        them after loading with the model's ``_init_weights``, in float32, and stores the result in the
        buffer's dtype; so does this (the parameters are still on the meta device: nothing else changes).
        """
        from transformers import PreTrainedModel

        assert ctx.model is not None
        holders = {parent(name): slot.module for name, slot in model_tensors(ctx.model, persistent_only=False).items()
                   if slot.is_buffer and not slot.persistent and slot.tensor.device.type != "meta"}
        models = {n: m for n, m in ctx.model.named_modules() if isinstance(m, PreTrainedModel)}
        with torch.no_grad():
            for module_name, module in holders.items():
                models[owner(module_name, models) or ""]._init_weights(module)

    def keep_in_fp32_modules(self, ctx: LoadContext) -> list[str]:
        assert ctx.model is not None
        keep: dict[str, None] = {}
        for module in ctx.model.modules():  # transformers 5 gathers them on the top model, older ones not
            if ctx.dtype == torch.float16:
                keep.update(dict.fromkeys(getattr(module, "_keep_in_fp32_modules", None) or ()))
            if ctx.dtype in (torch.float16, torch.bfloat16):
                keep.update(dict.fromkeys(getattr(module, "_keep_in_fp32_modules_strict", None) or ()))
        return list(keep)

    def cast_dtype(self, ctx: LoadContext, keep_in_fp32: Sequence[str]) -> torch.dtype | None:
        """transformers 5's rule: a tensor is loaded in the dtype its model tensor was built with.

        Built under the load dtype, most are in it; one the model builds with an explicit dtype (DeBERTa's
        float32 ``q_bias``) keeps that dtype, and those of ``keep_in_fp32`` modules are float32.
        """
        if int(_transformers_version().split(".")[0]) < 5:
            return ctx.dtype
        assert ctx.model is not None
        if keep_in_fp32:
            names = [name for name, slot in model_tensors(ctx.model).items()
                     if slot.tensor.device.type == "meta" and slot.tensor.is_floating_point()
                     and slot.tensor.dtype != torch.float32 and matches_module(name, keep_in_fp32)]
            _swap(ctx.model, names, lambda name, old: torch.empty_like(old, dtype=torch.float32))
        return None

    # -- keys ----------------------------------------------------------------------------------------
    def rename_key(self, key: str, ctx: LoadContext) -> str | None:
        keys = self._keys(ctx)
        if keys is None:
            return key
        return None if key in ctx.cache["transformers_converted"] else keys.renames.get(key, key)

    def target_name(self, key: str, ctx: LoadContext) -> str | None:
        """transformers' rename of ``key``, or the tensor a weight conversion fuses it into (names only)."""
        if "transformers_targets" not in ctx.cache:
            ctx.cache["transformers_targets"] = conversion_targets(ctx.model) if ctx.model is not None else None
        targets = ctx.cache["transformers_targets"]
        return key if targets is None else targets(key)

    def conversions(self, ctx: LoadContext) -> list[Conversion]:
        keys = self._keys(ctx)
        return [] if keys is None else keys.conversions

    def _keys(self, ctx: LoadContext) -> TransformersKeys | None:
        """transformers' registered renames and conversions for this model and checkpoint (once per load)."""
        if "transformers_keys" not in ctx.cache:
            try:
                from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: F401
            except ImportError:  # transformers 4: no conversion registry; prefix handling still applies
                ctx.cache["transformers_keys"] = None
                return None
            assert ctx.model is not None
            keys = plan_conversions(ctx.model, self.checkpoint(ctx).scan(), quantizer=ctx.cache.get("quantizer"),
                                    source_dtype=lambda key, target: self._source_dtype(ctx, key, target))
            ctx.cache["transformers_keys"] = keys
            ctx.cache["transformers_converted"] = keys.converted
        return ctx.cache["transformers_keys"]  # type: ignore[no-any-return]

    def _source_dtype(self, ctx: LoadContext, key: str, target: str) -> torch.dtype | None:
        """What ``from_pretrained`` casts a converted source to: the target's load dtype (floats only)."""
        assert ctx.model is not None
        info = self.checkpoint(ctx).scan()[key]
        current = ctx.model.get_parameter(target).dtype if _has_parameter(ctx.model, target) else None
        if ctx.dtype is None or current is None or not current.is_floating_point:
            return current
        return target_dtype(target, info.dtype, ctx.dtype, self.keep_in_fp32_modules(ctx))

    def ignore_unexpected_key(self, key: str, ctx: LoadContext) -> bool:
        pattern = ctx.cache.get("transformers_ignore")
        if pattern is None:
            assert ctx.model is not None
            patterns = set(getattr(ctx.model, "_keys_to_ignore_on_load_unexpected", None) or ())
            alternatives = "|".join(f"(?:{p})" for p in patterns) or "(?!)"  # (?!): matches nothing
            pattern = ctx.cache["transformers_ignore"] = re.compile(alternatives)
        return pattern.search(key) is not None

    # -- missing weights and fix-ups ---------------------------------------------------------------
    def init_missing(self, ctx: LoadContext, names: Sequence[str]) -> None:
        """Materialise missing tensors on CPU; run the owning (sub-)model's ``_init_weights`` on their modules."""
        from transformers import PreTrainedModel

        assert ctx.model is not None
        modules = self.materialize(ctx, names)
        models = {n: m for n, m in ctx.model.named_modules() if isinstance(m, PreTrainedModel)}
        with torch.no_grad():
            for module_name, module in modules.items():
                init: Callable[[nn.Module], None] = models[owner(module_name, models) or ""]._init_weights
                init(module)

    def tensor_sizes(self, ctx: LoadContext) -> dict[str, int]:
        assert ctx.model is not None
        quantizer = ctx.cache.get("quantizer")
        if quantizer is None:  # nothing to measure: no header is read (a pipeline stage opens only its shards)
            return {}
        return quantized_sizes(ctx.model, quantizer, self.conversions(ctx), self.checkpoint(ctx).scan())

    def check_device_map(self, ctx: LoadContext, device_map: Mapping[str, Any]) -> None:
        check_placement(ctx.cache.get("quantizer"), device_map, ctx.name_or_path)

    def after_load(self, ctx: LoadContext) -> None:
        model, config = ctx.model, ctx.config
        assert model is not None
        if ctx.dtype is not None:
            config.dtype = ctx.dtype
        config.name_or_path = ctx.name_or_path
        quantizer = ctx.cache.get("quantizer")
        if quantizer is not None:
            model.hf_quantizer = quantizer
            quantizer.postprocess_model(model)
        can_generate = getattr(model, "can_generate", None)
        if callable(can_generate) and can_generate():
            model.generation_config = self._generation_config(ctx)
        _retie_equal(model)

    def _generation_config(self, ctx: LoadContext) -> Any:
        """``generation_config.json`` when the model has one, else one derived from ``config.json``."""
        from transformers import GenerationConfig

        try:
            path = resolve_config(ctx.name_or_path, **ctx.hub_kwargs, config_name="generation_config.json")
        except (ModelFileNotFoundError, OfflineCacheMissError):
            assert ctx.config_file is not None
            return GenerationConfig.from_pretrained(
                str(ctx.config_file.parent), config_file_name="config.json", _from_model_config=True
            )
        return GenerationConfig.from_pretrained(str(path.parent))


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _retie_equal(model: nn.Module) -> None:
    """Tie again the ``_tied_weights_keys`` pairs a checkpoint stored twice with equal values (``.bin`` files do).

    Loading gave each stored name its own tensor; transformers ties equal pairs and leaves different ones
    untied, and so does this.
    """
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            a, b = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if a is not b and a.device == b.device and a.device.type != "meta" and a.dtype == b.dtype \
                and a.shape == b.shape and torch.equal(a, b):
            module, _, leaf = target.rpartition(".")
            put_tensor(ModelTensor(model.get_submodule(module), leaf, False), b)


def _auto_map_refs(auto_map: Mapping[str, Any]) -> list[str]:
    """Every ``module.Class`` reference of an ``auto_map`` (values may be lists: ``[slow, fast]``)."""
    refs: list[str] = []
    for value in auto_map.values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str):
                refs.append(ref)
    return refs


def _class_of(reference: str) -> str:
    """``"org/repo--module.Class"`` (code in another repo) or ``"module.Class"`` -> ``"Class"``."""
    return reference.split("--", 1)[-1].rsplit(".", 1)[-1]


def hook_encoder_outputs(model: nn.Module) -> None:
    """Give the encoder of an encoder-decoder model the hook transformers' ``generate`` expects.

    Seeing ``hf_device_map``, ``generate`` wants the encoder to return its outputs on the inputs' device:
    it sets ``encoder._hf_hook.io_same_device`` if the encoder has a hook, and otherwise attaches
    accelerate's own hook (or fails with a NameError when accelerate is not installed). Attaching ours
    here keeps accelerate out; it moves nothing but the encoder's outputs, once per ``generate``.
    """
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(get_encoder):
        return
    encoder = get_encoder()
    if isinstance(encoder, nn.Module) and encoder is not model and "_hf_hook" not in encoder.__dict__:
        add_hook_to_module(encoder, AlignDevicesHook(io_same_device=True))
