"""accelerate's offload helpers, on hf_bigmodel's offload folder.

Code written for accelerate saves a state dict for later with ``offload_state_dict(save_dir, state_dict)``
and reads it back through ``OffloadedWeightsLoader(save_folder=save_dir)`` (or hands ``save_dir`` to
``dispatch_model(offload_dir=...)``). The same calls work here; the folder holds safetensors files and a
checked ``index.json`` (see :mod:`.offload_folder`) instead of one ``.dat`` file per tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..model.naming import parent
from .offload_folder import OffloadFolder, load_offload_index
from .weights_map import DiskRef, WeightsMap

__all__ = ["OffloadedWeightsLoader", "offload_state_dict"]


def offload_state_dict(save_dir: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write ``state_dict`` to the offload folder ``save_dir``, module by module, and its ``index.json``.

    Read it back with :class:`OffloadedWeightsLoader` or ``dispatch_model(..., offload_dir=save_dir)``.
    Tensors sharing memory (tied weights) are stored once.

    Args:
        save_dir: The folder to write to (created if missing).
        state_dict: Tensor name -> tensor (any device).

    Example::

        offload_state_dict("offload", model.state_dict())
        weights = OffloadedWeightsLoader(save_folder="offload")
    """
    folder = OffloadFolder(save_dir)
    folder.prepare()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        by_module.setdefault(parent(name), {})[name] = tensor
    refs: dict[str, DiskRef] = {}
    for tensors in by_module.values():
        refs.update(folder.write(tensors))
    folder.write_index(refs)


class OffloadedWeightsLoader(WeightsMap):
    """Name -> tensor over a state dict in RAM and an offload folder's weights (read when accessed).

    Entries of ``state_dict`` win over the folder's, as in accelerate.

    Args:
        state_dict: Tensors kept in RAM.
        save_folder: An offload folder (from :func:`offload_state_dict`, ``disk_offload`` or a load); its
            ``index.json`` is checked before use.
        index: Already-loaded disk entries (``{name: DiskRef}``), instead of reading ``save_folder``'s index.
        device: Where tensors are returned (default: where they are, CPU for the folder's).
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        save_folder: str | os.PathLike[str] | None = None,
        index: Mapping[str, DiskRef] | None = None,
        device: int | str | torch.device | None = None,
    ) -> None:
        if state_dict is None and save_folder is None and index is None:
            raise ValueError("Need either a state_dict, a save_folder or an index of offloaded weights.")
        if index is None and save_folder is not None:
            index = load_offload_index(save_folder)
        super().__init__(memory=state_dict, disk=index)
        self.device = torch.device(f"cuda:{device}" if isinstance(device, int) else device) if device is not None \
            else None

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = super().__getitem__(name)
        return tensor if self.device is None else tensor.to(self.device)
