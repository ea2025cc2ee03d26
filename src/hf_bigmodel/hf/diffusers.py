"""Loading diffusers models (UNets, VAEs, DiT-like transformers...) as ``ModelMixin.from_pretrained`` does.

A model is a folder (or a repo ``subfolder`` such as ``"unet"`` of a pipeline) holding ``config.json``
with ``_class_name`` and ``diffusion_pytorch_model*.safetensors`` (or ``.bin``). Reproduced: the class
from ``_class_name`` (with diffusers' legacy remapping, e.g. ``Transformer2DModel`` ->
``DiTTransformer2DModel``), construction with ``from_config`` under the load dtype, ``dtype=None``
meaning float32 (no cast of the model's own dtype), ``_keep_in_fp32_modules`` for any requested dtype,
``_no_split_modules`` of every sub-model, the renames of deprecated attention blocks (``query`` ->
``to_q``...), and ``_name_or_path`` registered in the config.

diffusers itself is imported only when a model is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import Advice, ModelClassNotFoundError
from .hub import DIFFUSERS_WEIGHT_NAMES
from .loader import LoadContext, PretrainedLoader

__all__ = ["DiffusersLoader"]

#: Deprecated attention-block layers and their current names (diffusers' ``_fix_state_dict_keys_on_load``).
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


class DiffusersLoader(PretrainedLoader):
    """The :class:`~hf_bigmodel.hf.pretrained.PretrainedLoader` for diffusers models (config with ``_class_name``).

    Example::

        unet = load_pretrained_dispatched("stabilityai/sd-turbo", subfolder="unet", torch_dtype=torch.float16,
                                          max_memory={"cpu": "1GiB"}, offload_folder="offload")
    """

    weight_names = DIFFUSERS_WEIGHT_NAMES

    @classmethod
    def can_load(cls, config: Mapping[str, Any]) -> bool:
        return isinstance(config.get("_class_name"), str)

    def model_class(self, ctx: LoadContext, requested: type[nn.Module] | str | None) -> type[nn.Module]:
        import diffusers

        if isinstance(requested, type):
            cls = requested
        else:
            name = requested if isinstance(requested, str) else ctx.raw_config.get("_class_name")
            if not isinstance(name, str):
                raise ModelClassNotFoundError(
                    f"Config {str(ctx.config_file)!r} of {ctx.name_or_path!r} has no '_class_name' naming the "
                    "diffusers model class; pass model_class=."
                )
            found = getattr(diffusers, name, None)
            if not isinstance(found, type):
                raise ModelClassNotFoundError(
                    f"{'model_class=' if requested else 'Config ' + repr(str(ctx.config_file))} of "
                    f"{ctx.name_or_path!r} names model class {name!r}, which diffusers {_diffusers_version()} "
                    "does not provide (looked in the diffusers package). Upgrade diffusers, or pass "
                    "model_class= with the class to build."
                )
            cls = found
        if not issubclass(cls, diffusers.ModelMixin):
            raise ModelClassNotFoundError(
                f"{cls.__name__} (from {str(ctx.config_file)!r}) is not a diffusers model with weights (not a "
                "ModelMixin).", advice=[Advice("For a pipeline, pass {} naming one of its model components "
                                               "('unet', 'vae').", "subfolder", "'unet'")],
            )
        return _remapped(cls, ctx.raw_config)

    def apply_kwargs(self, ctx: LoadContext, kwargs: dict[str, Any]) -> None:
        """Keyword arguments naming ``__init__`` parameters of the class override the config (as from_config)."""
        assert ctx.model_class is not None
        accepted = inspect.signature(ctx.model_class.__init__).parameters
        for key in list(kwargs):
            if key in accepted and key != "self":
                ctx.config[key] = kwargs.pop(key)

    def build_model(self, ctx: LoadContext) -> nn.Module:
        assert ctx.model_class is not None
        return ctx.model_class.from_config(ctx.config)  # type: ignore[attr-defined,no-any-return]

    def keep_in_fp32_modules(self, ctx: LoadContext) -> list[str]:
        assert ctx.model_class is not None
        keep = getattr(ctx.model_class, "_keep_in_fp32_modules", None) or []
        return [keep] if isinstance(keep, str) else list(keep)

    def rename_key(self, key: str, ctx: LoadContext) -> str | None:
        paths = ctx.cache.get("diffusers_deprecated_attention")
        if paths is None:
            assert ctx.model is not None
            paths = ctx.cache["diffusers_deprecated_attention"] = {
                name for name, module in ctx.model.named_modules()
                if getattr(module, "_from_deprecated_attn_block", False)
            }
        if paths:
            module_path, _, rest = key.rpartition(".")
            block, _, layer = module_path.rpartition(".")
            if layer in _DEPRECATED_ATTENTION and block in paths:
                return f"{block}.{_DEPRECATED_ATTENTION[layer]}.{rest}"
        return key

    def base_model_prefix(self, ctx: LoadContext) -> str:
        return ""  # diffusers models have no base model / head split

    def after_load(self, ctx: LoadContext) -> None:
        register = getattr(ctx.model, "register_to_config", None)
        if callable(register):
            register(_name_or_path=ctx.name_or_path)


def _remapped(cls: type[nn.Module], config: Mapping[str, Any]) -> type[nn.Module]:
    """diffusers' legacy class remapping (``LegacyModelMixin``), e.g. a DiT saved as ``Transformer2DModel``."""
    try:
        from diffusers.models.model_loading_utils import (
            _CLASS_REMAPPING_DICT,
            _fetch_remapped_cls_from_config,
        )
    except ImportError:
        return cls
    if cls.__name__ in _CLASS_REMAPPING_DICT and "norm_type" in config:
        return _fetch_remapped_cls_from_config(config, cls)  # type: ignore[no-any-return]
    return cls
