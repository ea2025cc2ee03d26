"""Setting a pipeline up on every rank: budgets exchanged, stages agreed, this rank's weights loaded.

Each rank runs the same steps on the same empty model: it measures (or reads) its own memory budget,
all ranks swap budgets through the store, each plans the same cut (checked: ranks that disagree stop),
plans its own stage within its own budget, and loads exactly the checkpoint keys its stage holds, from
exactly the shards that store them, with the single-process loader and dispatch (the other stages'
modules are detached meanwhile, so they stay on the meta device and are never read). A rank that
fails records why; the others stop with that reason instead of waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import PipelineError
from ..load.loading import OFFLOAD_ATTR, load_checkpoint
from ..model.naming import is_within
from ..model.sizes import find_tied_parameters
from ..model.tensors import model_tensors
from ..plan.devices import Device, normalize_device
from ..plan.memory import get_max_memory
from ..plan.placement import Placement
from ..runtime.dispatch import dispatch_model
from ..storage.checkpoint import Checkpoint, find_checkpoint, read_weight_map
from .faults import Monitor, abandon
from .pipeline import Pipeline
from .stages import StagePlan, plan_stages, stage_device_map
from .view import stage_only
from .world import World, join_world

__all__ = [
    "StageLoad",
    "agree_on_stages",
    "load_stage",
    "loading_stage",
    "own_budgets",
    "stage_checkpoint",
    "stage_keys",
]


def own_budgets(max_memory: Mapping[int | str, int | str] | None, world: World) -> dict[Device, int]:
    """This process's budgets: ``max_memory`` as given (per process), or what is free on this machine.

    A process computes on one GPU (``cuda:LOCAL_RANK``), so a budget for one GPU index is that GPU's
    whatever the index (every process may pass the same ``{0: "20GiB", "cpu": "30GiB"}``); with several
    GPU entries, the one of this process's GPU counts. Measured RAM is split among the host's processes.
    """
    budgets = get_max_memory(max_memory, check_devices=False)
    gpus = [d for d in budgets if isinstance(d, int)]
    mine = world.device.index if world.device.type == "cuda" else None
    kept: dict[Device, int] = {d: v for d, v in budgets.items() if not isinstance(d, int)}
    if gpus and mine is None:
        raise PipelineError(f"max_memory gives GPU budgets ({gpus}) but rank {world.rank} has no GPU (CUDA is "
                            "unavailable here); give it 'cpu' (and 'disk') budgets.", rank=world.rank)
    if len(gpus) == 1 and mine is not None:
        kept = {mine: budgets[gpus[0]], **kept}
    elif mine in gpus:
        kept = {mine: budgets[mine], **kept}
    elif gpus:
        raise PipelineError(
            f"max_memory names GPUs {gpus} but rank {world.rank} computes on GPU {mine} (its LOCAL_RANK): give "
            "one GPU budget (it applies to each process's own GPU) or include this one.", rank=world.rank)
    if max_memory is None and "cpu" in kept:
        kept["cpu"] //= max(world.local_size, 1)
    return kept


def _encode(budgets: Mapping[Device, int]) -> str:
    return json.dumps([[d, v] for d, v in budgets.items()])


def _decode(text: str) -> dict[Device, int]:
    return {normalize_device(d): int(v) for d, v in json.loads(text)}


def agree_on_stages(
    model: nn.Module, world: World, monitor: Monitor, budgets: Mapping[Device, int], *,
    no_split_module_classes: Iterable[str] | None = None, dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None, tensor_sizes: Mapping[str, int] | None = None,
) -> StagePlan:
    """Swap budgets with the other ranks and plan the cut; every rank must reach the same one."""
    everyone = [_decode(v) for v in monitor.exchange("budgets", _encode(budgets), "exchanging memory budgets")]
    plan = plan_stages(model, budgets=everyone, no_split_module_classes=no_split_module_classes, dtype=dtype,
                       special_dtypes=special_dtypes, tensor_sizes=tensor_sizes)
    described = json.dumps([type(model).__name__, plan.to_dict()], sort_keys=True)
    digests = monitor.exchange("plan", hashlib.sha256(described.encode()).hexdigest(), "agreeing on the stages")
    if len(set(digests)) > 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise PipelineError(
            f"Ranks {odd} planned other stages than rank 0 for {type(model).__name__}: they built a different "
            "model (another config, or other versions of torch/transformers on their hosts). Give every rank "
            "the same model and library versions.", rank=world.rank)
    return plan


def stage_keys(
    keys: Iterable[str], held: Iterable[str], ties: Iterable[Iterable[str]],
    base: Callable[[str], str | None] | None = None,
) -> dict[str, str]:
    """Checkpoint key -> tensor name, for the keys a stage loads (``held``: its tensors' names).

    ``base`` maps a key to its model name (``None``: dropped). A tensor the stage holds whose tied partner
    is the one the checkpoint stores (an output head tied to embeddings of another stage) gets that key.

    >>> stage_keys(["embed.weight", "block.weight"], ["head.weight"], [["embed.weight", "head.weight"]])
    {'embed.weight': 'head.weight'}
    """
    held = set(held)
    named = {key: (base(key) if base is not None else key) for key in keys}
    chosen = {key: name for key, name in named.items() if name is not None and name in held}
    covered = set(chosen.values())
    partners = {name: list(group) for group in ties for name in group}
    for key, name in named.items():
        if name is None or key in chosen:
            continue
        for partner in partners.get(name, ()):
            if partner in held and partner not in covered:
                chosen[key] = partner
                covered.add(partner)
                break
    return chosen


def stage_checkpoint(checkpoint: Checkpoint, wanted: Iterable[str]) -> Checkpoint:
    """``checkpoint`` restricted to the shards holding keys ``wanted`` (only their headers will be read)."""
    if checkpoint.index_file is None:
        return checkpoint  # one file: every stage reads its own tensors' bytes from it
    where = read_weight_map(checkpoint.index_file)
    files = list(dict.fromkeys(where[k] for k in wanted if k in where))
    return Checkpoint(checkpoint.path, checkpoint.format, files, index_file=checkpoint.index_file)


class StageLoad:
    """One rank loading its stage: the world it joined, its budgets, then the plan, its device map and tensors.

    ``model`` (the empty model) is set by :meth:`plan_stage` when not given at first.
    """

    def __init__(self, model: nn.Module | None, world: World, monitor: Monitor,
                 max_memory: Mapping[int | str, int | str] | None) -> None:
        self._model, self.world, self.monitor = model, world, monitor
        self.max_memory = max_memory
        self.budgets: dict[Device, int] = {}
        self.plan: StagePlan | None = None
        self.device_map: dict[str, Device] = {}
        self.held: set[str] = set()
        self.pipeline: Pipeline | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise PipelineError("StageLoad: plan_stage(model) first.", rank=self.world.rank)
        return self._model

    def plan_stage(self, model: nn.Module | None = None, *, no_split_module_classes: Iterable[str] | None = None,
                   dtype: str | torch.dtype | None = None,
                   special_dtypes: Mapping[str, str | torch.dtype] | None = None,
                   offload_buffers: bool = False, tensor_sizes: Mapping[str, int] | None = None) -> StagePlan:
        """Agree on the cut of the empty ``model`` with the other ranks; plan this rank's stage within its budget.

        ``tensor_sizes``: bytes of quantized weights, as :func:`~hf_bigmodel.infer_auto_device_map` takes them.
        """
        if model is not None:
            self._model = model
        self.budgets = own_budgets(self.max_memory, self.world)
        plan = agree_on_stages(self.model, self.world, self.monitor, self.budgets,
                               no_split_module_classes=no_split_module_classes, dtype=dtype,
                               special_dtypes=special_dtypes, tensor_sizes=tensor_sizes)
        self.device_map = stage_device_map(self.model, plan, self.world.rank, self.budgets,
                                           no_split_module_classes=no_split_module_classes, dtype=dtype,
                                           special_dtypes=special_dtypes, offload_buffers=offload_buffers,
                                           tensor_sizes=tensor_sizes)
        units = plan.held_by(self.world.rank)
        self.held = {n for n in model_tensors(self.model) if any(is_within(n, u) for u in units)}
        self.plan = plan
        return plan

    def keys(self, checkpoint: Checkpoint, base: Callable[[str], str | None] | None = None) -> dict[str, str]:
        """Checkpoint key -> tensor name for the keys this stage loads (see :func:`stage_keys`)."""
        return stage_keys(checkpoint.keys(), self.held, find_tied_parameters(self.model), base)

    def detached(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The model as this stage alone (load and dispatch inside)."""
        assert self.plan is not None, "plan_stage() first"
        return stage_only(self.model, self.plan.not_held_by(self.world.rank))


@contextlib.contextmanager
def loading_stage(max_memory: Mapping[int | str, int | str] | None,
                  model: nn.Module | None = None) -> Iterator[StageLoad]:
    """Join the pipeline first, then load this rank's stage inside the block; on exit, start the pipeline.

    Everything in the block (reading the config, building the model, loading) is watched: another rank's
    failure interrupts it, and a failure here is recorded for the others (who stop with its reason) and
    tears this rank down. After the block every rank waits for all to have loaded.
    """
    world = join_world()
    monitor = Monitor(world)
    load = StageLoad(model, world, monitor, max_memory)
    try:
        with monitor.interruptible("loading"):
            yield load
        if load.plan is None:
            raise PipelineError("loading_stage(): the block never planned the stage (call plan_stage()).")
        load.pipeline = Pipeline(world, monitor, load.plan, load.model,
                                 Placement.of(load.device_map).main_torch_device)
        monitor.exchange("loaded", "", "waiting for every stage to load")
    except BaseException as err:
        if load.pipeline is not None:
            load.pipeline.abandoned()
        abandon(monitor, "loading", err)
        raise


def load_stage(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    *,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_buffers: bool = False,
    prefetch: int | None = None,
) -> Pipeline:
    """Load this rank's stage of the empty ``model`` from ``checkpoint`` and join the pipeline (every rank).

    ``max_memory`` is this process's budget (each rank may pass its own); stages are balanced against
    every rank's. Afterwards ``model(...)`` on every rank runs the pipeline and returns the last stage's
    output everywhere. Returns the :class:`Pipeline` (also ``model.pipeline``).

    Example (``torchrun --nproc-per-node 2 script.py``)::

        with init_empty_weights():
            model = MyModel()
        pipeline = load_stage(model, "ckpt/", max_memory={"cpu": "2GiB"}, no_split_module_classes=["Block"])
        logits = model(ids)      # the same on every rank
        pipeline.close()
    """
    with loading_stage(max_memory, model) as load:
        load.plan_stage(no_split_module_classes=no_split_module_classes, dtype=dtype, offload_buffers=offload_buffers)
        ckpt = find_checkpoint(checkpoint, require_shards=False)
        table = load.keys(ckpt)
        with load.detached():
            report = load_checkpoint(model, stage_checkpoint(ckpt, table), device_map=load.device_map, dtype=dtype,
                                     offload_folder=offload_folder, offload_buffers=offload_buffers,
                                     key_mapping=table.get)
            if report.weights:
                setattr(model, OFFLOAD_ATTR, report.weights)
            dispatch_model(model, load.device_map, offload_dir=offload_folder, offload_buffers=offload_buffers,
                           prefetch=prefetch)
    assert load.pipeline is not None
    model.pipeline = load.pipeline  # type: ignore[assignment]
    return load.pipeline
