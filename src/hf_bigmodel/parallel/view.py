"""One stage of a model seen as a whole model: the other stages' modules detached for a while.

Loading, planning and dispatch work on a model and all its tensors. A pipeline stage is a subset of the
model; :func:`stage_only` makes the model *be* that subset for the duration of a ``with`` block, by
replacing every module the stage does not hold with an empty placeholder. Inside, ``named_parameters``
and the loader see only the stage's tensors (under their usual names), so the unchanged single-process
loader reads only the stage's weights and dispatch hooks only the stage's modules. On exit the other
modules are put back, untouched (still on the meta device).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

from torch import nn

from ..model.naming import is_within, parent

__all__ = ["stage_only"]


class _Detached(nn.Module):
    """What stands where a module of another stage was (holds nothing, runs nothing)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.detached_name = name

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self.detached_name} belongs to another pipeline stage and was detached here.")


@contextmanager
def stage_only(model: nn.Module, detach: Collection[str]) -> Iterator[nn.Module]:
    """Within the block, ``model`` without the modules named in ``detach`` (restored on exit, even on error).

    Names must be submodules (not the root); ones nested in another detached name are skipped.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> with stage_only(net, ["1"]) as stage:
    ...     sorted(n for n, _ in stage.named_parameters())
    ['0.bias', '0.weight']
    >>> sorted(n for n, _ in net.named_parameters())
    ['0.bias', '0.weight', '1.bias', '1.weight']
    """
    names = sorted(detach, key=lambda n: (n.count("."), n))
    outer = [n for n in names if not any(o != n and is_within(n, o) for o in names)]
    taken: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in outer:
            if not name:
                raise ValueError("stage_only cannot detach the root module.")
            holder = model.get_submodule(parent(name))
            leaf = name.rpartition(".")[2]
            taken.append((holder, leaf, holder._modules[leaf]))  # type: ignore[arg-type]
            holder._modules[leaf] = _Detached(name)
        yield model
    finally:
        for holder, leaf, module in reversed(taken):
            holder._modules[leaf] = module
