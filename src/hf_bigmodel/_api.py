"""The public API, imported on first use of any ``hf_bigmodel.<name>`` (see ``hf_bigmodel/__init__.py``)."""

from __future__ import annotations

from .errors import (
    BigModelError,
    BigModelWarning,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeviceMapError,
    DtypeError,
    FileChangedError,
    GatedModelError,
    HubError,
    InvalidIndexError,
    InvalidMaxMemoryError,
    ModelClassNotFoundError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    OfflineCacheMissError,
    OffloadedWeightUseError,
    OffloadError,
    PipelineError,
    RankFailedError,
    RevisionNotFoundError,
    UnsafeCheckpointError,
)
from .hf.loader import LoadContext, PretrainedLoader
from .hf.pretrained import load_pretrained_dispatched
from .hf.registry import register_loader, unregister_loader
from .load.loading import load_checkpoint_in_model
from .model.empty import init_empty_weights, init_on_device
from .model.sizes import compute_module_sizes, find_tied_parameters, format_size, parse_size
from .plan.balance import get_balanced_memory
from .plan.device_map import check_device_map, resolve_device_map
from .plan.memory import get_max_memory
from .plan.planner import infer_auto_device_map
from .runtime.dispatch import dispatch_model, load_checkpoint_and_dispatch
from .runtime.hooks import (
    AlignDevicesHook,
    CpuOffload,
    ModelHook,
    SequentialHook,
    UserCpuOffloadHook,
    add_hook_to_module,
    remove_hook_from_module,
    remove_hook_from_submodules,
)
from .runtime.offload_model import cpu_offload, cpu_offload_with_hook, disk_offload
from .storage.accelerate_compat import OffloadedWeightsLoader, offload_state_dict

__all__ = [
    # empty skeletons
    "init_empty_weights",
    "init_on_device",
    # sizes and planning
    "compute_module_sizes",
    "find_tied_parameters",
    "format_size",
    "parse_size",
    "get_max_memory",
    "get_balanced_memory",
    "infer_auto_device_map",
    "resolve_device_map",
    "check_device_map",
    # loading and dispatch
    "load_checkpoint_in_model",
    "load_checkpoint_and_dispatch",
    "dispatch_model",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "offload_state_dict",
    "OffloadedWeightsLoader",
    # hooks
    "ModelHook",
    "SequentialHook",
    "AlignDevicesHook",
    "CpuOffload",
    "UserCpuOffloadHook",
    "add_hook_to_module",
    "remove_hook_from_module",
    "remove_hook_from_submodules",
    # the Hugging Face adapter
    "load_pretrained_dispatched",
    "PretrainedLoader",
    "LoadContext",
    "register_loader",
    "unregister_loader",
    # errors
    "BigModelError",
    "BigModelWarning",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DeviceMapError",
    "DtypeError",
    "FileChangedError",
    "GatedModelError",
    "HubError",
    "InvalidIndexError",
    "InvalidMaxMemoryError",
    "ModelClassNotFoundError",
    "ModelFileNotFoundError",
    "ModelNotFoundError",
    "OfflineCacheMissError",
    "OffloadError",
    "OffloadedWeightUseError",
    "PipelineError",
    "RankFailedError",
    "RevisionNotFoundError",
    "UnsafeCheckpointError",
]
