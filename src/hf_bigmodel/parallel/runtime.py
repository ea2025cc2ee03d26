"""How one stage runs the model's own ``forward``: its modules compute, the others' stand in, cuts talk.

Every rank calls the whole model's ``forward`` (the code between modules, masks, position ids, runs
everywhere; it is cheap). What differs per rank:

- A block of another stage does not run: it returns its input, marked as a *placeholder*.
- Another stage's module outside the spine (embeddings, final norm, head) runs on the meta device, shapes
  only, and returns zeros of the right shape marked as placeholders, so the code around it can go on.
- The first block of the next stage, reached on this rank, sends its input there (the exit of the stage).
- This stage's first block receives its input from the previous stage instead (the entry).

A placeholder is a ``torch.Tensor`` subclass, so whatever the code computes from one is a placeholder
too. Every module this stage runs checks its inputs: one computed from a placeholder (other than the
entry's, which is replaced) means the model passes something besides the hidden states between blocks
of different stages, and the pipeline refuses it rather than compute with made-up values.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PipelineError
from ..runtime.hook_protocol import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from .channel import Channel, Kind, MessageId
from .stages import StagePlan

__all__ = ["Placeholder", "StageRuntime", "first_tensor", "map_tensors"]


class Placeholder(torch.Tensor):
    """A value another stage computes; here only its shape, dtype and device are right."""


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside (tuples, lists, dicts and model outputs followed)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, Mapping):
        new = copy.copy(obj)
        for key in obj:
            new[key] = map_tensors(obj[key], fn)  # type: ignore[index]
        return new
    return obj


def _find_placeholder(obj: Any, path: str) -> str | None:
    if isinstance(obj, Placeholder):
        return path
    if isinstance(obj, (list, tuple)):
        return next((p for i, o in enumerate(obj) if (p := _find_placeholder(o, f"{path}[{i}]"))), None)
    if isinstance(obj, Mapping):
        return next((p for k, v in obj.items() if (p := _find_placeholder(v, f"{path}[{k!r}]"))), None)
    return None


def first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[int | str, torch.Tensor]:
    """Where a block's hidden states are: its first positional tensor, else ``hidden_states=``."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            return i, arg
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return "hidden_states", value
    raise PipelineError("A pipeline block was called without a tensor input (its hidden states); "
                        "this model cannot be cut into stages.")


def _replace(args: tuple[Any, ...], kwargs: dict[str, Any], where: int | str,
             value: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(where, int):
        return (*args[:where], value, *args[where + 1:]), kwargs
    return args, {**kwargs, where: value}


def as_placeholder(tensor: torch.Tensor) -> Placeholder:
    return tensor.as_subclass(Placeholder)  # type: ignore[return-value]


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(torch.Tensor) if isinstance(tensor, Placeholder) else tensor


@dataclass
class _Call:
    """The forward call in progress: which message its cuts exchange, and whether they happened."""

    at: MessageId
    entered: bool = False
    exited: bool = False


class _CheckInputs(ModelHook):
    """On a module this stage runs: refuse inputs computed from another stage's placeholders."""

    def __init__(self, runtime: StageRuntime, name: str) -> None:
        self.runtime, self.name = runtime, name

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.name == self.runtime.entry:
            args, kwargs = self.runtime.receive(args, kwargs)
        found = _find_placeholder(args, "args") or _find_placeholder(kwargs, "kwargs")
        if found is not None:
            raise PipelineError(
                f"{self.name} (stage {self.runtime.stage}) would get {found} computed from modules of another "
                f"stage, not from the hidden states passed between blocks (the only value that travels between "
                f"stages). This model cannot be cut into pipeline stages: load it on one process.",
                rank=self.runtime.stage)
        return args, kwargs


class StageRuntime:
    """Installs and removes what lets ``model.forward`` run stage ``stage`` of ``plan`` on this rank."""

    def __init__(self, model: nn.Module, plan: StagePlan, stage: int, channel: Channel,
                 device: torch.device) -> None:
        self.model, self.plan, self.stage, self.channel, self.device = model, plan, stage, channel, device
        self.entry, self.exit = plan.entry(stage), plan.exit(stage)
        self.call: _Call | None = None
        self._replaced: list[nn.Module] = []
        self._hooked: list[nn.Module] = []
        self._meta: dict[str, dict[str, torch.Tensor]] = {}
        try:
            self._install()
        except BaseException:
            self.close()
            raise

    def _install(self) -> None:
        blocks = set(self.plan.blocks)
        for name in self.plan.not_held_by(self.stage):
            module = self.model.get_submodule(name)
            stand_in = self._skip_block(name) if name in blocks else self._shapes_only(name, module)
            module.forward = stand_in  # type: ignore[method-assign]
            self._replaced.append(module)
        for name in self.plan.held_by(self.stage):
            if self.plan.stage_of(name) is None and name not in blocks:
                continue  # shared modules compute from inputs every rank has
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                continue  # a tensor held by a module around the spine
            add_hook_to_module(module, _CheckInputs(self, name), append=True)
            self._hooked.append(module)

    def close(self) -> None:
        """Give every module its own ``forward`` back (the dispatch hooks stay)."""
        for module in self._replaced:
            module.__dict__.pop("forward", None)
        for module in self._hooked:
            hook = module.__dict__.get("_hf_hook")
            if isinstance(hook, SequentialHook):
                hook.hooks = [h for h in hook.hooks if not isinstance(h, _CheckInputs)]
            elif isinstance(hook, _CheckInputs):
                remove_hook_from_module(module)
        self._replaced.clear()
        self._hooked.clear()

    @contextlib.contextmanager
    def calling(self, at: MessageId) -> Iterator[None]:
        """Run one forward whose cuts exchange message ``at``; checks it crossed this stage's cuts once each."""
        if self.call is not None:
            raise PipelineError("A pipelined forward is already running on this rank; calls cannot nest.")
        self.call = _Call(at)
        try:
            yield
            missing = [(b, "entry") for b, done in ((self.entry, self.call.entered), (self.exit, self.call.exited))
                       if b is not None and not done]
            if missing:
                raise PipelineError(
                    f"The forward of stage {self.stage} never reached {missing[0][0]}, where it "
                    f"{'receives' if missing[0][0] == self.entry else 'sends'} the hidden states; the model's "
                    "forward skips blocks for these inputs, which a pipeline cannot follow.", rank=self.stage)
        finally:
            self.call = None

    def _active(self, name: str) -> _Call:
        if self.call is None:
            raise PipelineError(
                f"{type(self.model).__name__} holds only stage {self.stage} of {self.plan.num_stages} on this rank "
                f"({name} runs elsewhere): call model.generate(...) or model(...) on every rank, which run the "
                "pipeline, instead of a submodule.", rank=self.stage)
        return self.call

    def receive(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """At the entry block: replace the placeholder hidden states by the previous stage's."""
        call = self._active(str(self.entry))
        where, hidden = first_tensor(args, kwargs)
        if call.entered:
            raise PipelineError(f"{self.entry} ran twice in one forward; a pipeline cannot follow it.", rank=self.stage)
        incoming = self.channel.post(self.stage - 1, kind=Kind.ACTIVATION, at=call.at, shape=hidden.shape,
                                     dtype=hidden.dtype, what=f"receiving the input of {self.entry}")
        value = incoming.wait().to(hidden.device)
        call.entered = True
        return _replace(args, kwargs, where, value)

    def _skip_block(self, name: str) -> Callable[..., Any]:
        def stand_in(*args: Any, **kwargs: Any) -> Any:
            call = self._active(name)
            _, hidden = first_tensor(args, kwargs)
            if name == self.exit:
                if isinstance(hidden, Placeholder) or call.exited:
                    raise PipelineError(f"Stage {self.stage} reached {name} without its own result; "
                                        "a pipeline cannot follow this model's forward.", rank=self.stage)
                self.channel.send(hidden, self.stage + 1, kind=Kind.ACTIVATION, at=call.at,
                                  what=f"sending the input of {name}")
                call.exited = True
            return as_placeholder(hidden)

        return stand_in

    def _shapes_only(self, name: str, module: nn.Module) -> Callable[..., Any]:
        meta = {n: torch.empty_like(t, device="meta")
                for n, t in [*module.named_parameters(), *module.named_buffers()]}

        def to_meta(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device="meta")

        def stand_in(*args: Any, **kwargs: Any) -> Any:
            self._active(name)
            del module.forward  # functional_call calls the module: its own forward, on meta weights
            try:
                out = torch.func.functional_call(module, meta, map_tensors(args, to_meta), map_tensors(kwargs, to_meta))
            finally:
                module.forward = stand_in  # type: ignore[method-assign]
            return map_tensors(out, lambda t: as_placeholder(torch.zeros(t.shape, dtype=t.dtype, device=self.device)))

        return stand_in
