"""Where weights are stored and where they run: one rule, derived once from a device map.

A device-map value says where a module's weights are *stored* (accelerate's meaning). Where the module
*runs* follows from one rule, used by the planner, dispatch, the command line and the benchmark:

- the *main* device is the one given explicitly, else the first accelerator the map uses, else the CPU;
- weights stored on an accelerator run there;
- weights stored on ``"disk"`` are *offloaded*: they are read just before their module runs on the main
  device; so are weights stored on ``"cpu"`` when the main device is an accelerator;
- weights stored on ``"cpu"`` with a CPU main device are simply resident in RAM.

``hf_device_map`` stays accelerate's plain dict; a :class:`Placement` is what code derives from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..model.naming import lookup
from .devices import Device, device_rank, is_offload_target, normalize_device, torch_device

__all__ = ["Placement", "main_device_of"]


def main_device_of(devices: Iterable[Device]) -> Device:
    """The first accelerator among ``devices`` (GPUs by index first), else ``"cpu"``.

    >>> main_device_of(["cpu", 1, "disk", 0])
    0
    >>> main_device_of(["cpu", "disk"])
    'cpu'
    """
    accelerators = sorted((d for d in devices if not is_offload_target(d)), key=device_rank)
    return accelerators[0] if accelerators else "cpu"


@dataclass(frozen=True)
class Placement:
    """A device map read as "stored on" and "runs on", with the main device that runs offloaded weights.

    Example::

        placement = Placement.of({"embed": 0, "layers": "cpu", "head": "disk"})
        placement.main                              # 0
        placement.stored_on("layers.3.weight")      # 'cpu'
        placement.runs_on("layers.3.weight")        # 0 (streamed from RAM)
        placement.is_offloaded("cpu")               # True
    """

    device_map: Mapping[str, Device]
    main: Device
    #: Whether ``"cpu"`` entries are streamed to the main device (it is an accelerator) or resident.
    cpu_is_offloaded: bool

    @classmethod
    def of(
        cls,
        device_map: Mapping[str, Device],
        *,
        main_device: int | str | torch.device | None = None,
        offload_cpu: bool | None = None,
    ) -> Placement:
        """The placement of a normalised ``device_map``; ``main_device`` and ``offload_cpu`` override the rule.

        >>> Placement.of({"": "cpu"}).main, Placement.of({"": "cpu"}).is_offloaded("cpu")
        ('cpu', False)
        """
        main = normalize_device(main_device) if main_device is not None else main_device_of(device_map.values())
        if main == "disk":
            raise ValueError("The main device runs modules; 'disk' only stores weights. Pass a GPU index or 'cpu'.")
        cpu_offloaded = main != "cpu" if offload_cpu is None else offload_cpu
        return cls(dict(device_map), main, cpu_offloaded)

    def is_offloaded(self, device: Device) -> bool:
        """True when weights stored on ``device`` are read just before they run, on the main device."""
        return device == "disk" or (device == "cpu" and self.cpu_is_offloaded)

    def execution_device(self, device: Device) -> Device:
        """Where weights stored on ``device`` run."""
        return self.main if self.is_offloaded(device) else device

    def stored_on(self, name: str) -> Device:
        """Where the weights of module or tensor ``name`` are stored (the most specific map entry)."""
        return lookup(name, self.device_map)

    def runs_on(self, name: str) -> Device:
        """Where module or tensor ``name`` runs."""
        return self.execution_device(self.stored_on(name))

    @property
    def offload_targets(self) -> frozenset[Device]:
        """The storage devices whose weights are streamed: ``{"disk"}`` or ``{"cpu", "disk"}``."""
        return frozenset({"cpu", "disk"} if self.cpu_is_offloaded else {"disk"})

    @property
    def execution_devices(self) -> set[Device]:
        """Every device something runs on."""
        return {self.execution_device(d) for d in self.device_map.values()}

    @property
    def offloads(self) -> bool:
        """True when some weights are streamed."""
        return any(self.is_offloaded(d) for d in self.device_map.values())

    @property
    def main_torch_device(self) -> torch.device:
        """The ``torch.device`` inputs go to (``0`` -> ``cuda:0``)."""
        return torch_device(self.main)
