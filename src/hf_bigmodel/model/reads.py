"""Weights a module's forward reads from its submodules without calling them, found from the code.

An offloading hook brings a module's weights in when that module is called. Some forwards use a
submodule's tensor without calling the submodule, so its hook never fires for that use:
``nn.MultiheadAttention`` hands ``self.out_proj.weight`` to a function, DeBERTa-v2's encoder reads
``self.rel_embeddings.weight``, Mamba's mixer passes ``self.dt_proj.weight`` to a kernel, and JetMoE calls
``self.experts.map(...)`` (not ``forward``), which reads ``self.bias``. :func:`direct_reads` finds such
reads by reading the source of each module class's ``forward`` and of the methods and properties it
calls on ``self`` and on submodules, then resolving every ``self.a.b...`` chain against the module
tree. Dispatch makes the reading module fetch those tensors for its whole forward.

It reads the code, not a run: every branch counts (a read in a CUDA-only branch too), and uses that only
look at metadata (``self.proj.weight.dtype``, ``.shape``, ``isinstance(...)``) do not. Reads it cannot
see (through ``getattr`` or a free function handed the module) are caught when they happen: an
offloaded weight's placeholder refuses to take part in a computation.

The other way round, :func:`row_readable` says when a module's forward reads only part of its weight: a
plain ``nn.Embedding`` gathers the rows of its input's ids, so a hook may bring just those rows.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .tensors import model_tensors, tie_groups

__all__ = ["direct_reads", "placed_with_others", "row_readable"]

#: Attributes and methods of a tensor that look at its metadata only.
_METADATA = frozenset({
    "dtype", "device", "shape", "ndim", "layout", "is_cuda", "is_meta", "is_sparse", "is_quantized",
    "requires_grad", "size", "dim", "numel", "nelement", "element_size", "is_floating_point",
    "is_complex", "is_contiguous", "data_ptr", "stride", "nbytes", "itemsize",
})
#: Calls whose arguments are only inspected, never computed with.
_INSPECTING_CALLS = frozenset({"isinstance", "hasattr", "getattr", "type", "id", "len", "callable"})

def row_readable(module: nn.Module, names: Sequence[str]) -> bool:
    """True when ``module`` (holding the tensors ``names``) is a plain ``nn.Embedding`` with its weight alone:
    its forward reads only the rows its ids name, exactly as from the whole matrix (no subclass forward,
    no ``max_norm``, which renormalises rows of the weight in place)."""
    if not isinstance(module, nn.Embedding) or type(module).forward is not nn.Embedding.forward:
        return False
    return module.max_norm is None and len(names) == 1 and names[0].rpartition(".")[2] == "weight"


# One use of ``self`` in a function: ("read", chain) for ``self.a.b``, ("call", chain) for ``self.a.b(...)``.
_Use = tuple[str, tuple[str, ...]]


def placed_with_others(model: nn.Module) -> set[str]:
    """Full names of the tensors whose place is bound to another module's: tied to another name, or read by
    another module's forward without calling their own (:func:`direct_reads`). A plan moving one of their
    modules alone (an embedding to disk by row, a block traded for another) must leave them be."""
    bound = {name for group in tie_groups(model_tensors(model)) for name in group}
    return bound | {tensor for tensors in direct_reads(model).values() for tensor in tensors}


def direct_reads(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> full names of the tensors below it that its forward reads without calling their module.

    A tensor read by several nested modules is listed under the outermost one (its forward spans the
    others'). Modules whose code cannot be read (built-in, generated) are taken to read nothing.

    >>> direct_reads(nn.Sequential(nn.MultiheadAttention(4, 2)))
    {'0': ['0.out_proj.weight', '0.out_proj.bias']}
    """
    reader: dict[str, str] = {}
    for name, module in model.named_modules():  # parents come first: the outermost reader wins
        dot = f"{name}." if name else ""
        for path in _forward_reads(module):
            reader.setdefault(dot + path, name)
    found: dict[str, list[str]] = {}
    for tensor, module_name in reader.items():
        found.setdefault(module_name, []).append(tensor)
    return found


def _forward_reads(module: nn.Module) -> list[str]:
    """Paths (relative to ``module``) of the descendants' tensors that ``module.forward`` reads directly."""
    forward = getattr(type(module), "forward", None)
    if not module._modules or forward is None or forward is nn.Module.forward:
        return []  # a leaf module has no submodule to read from
    found: dict[str, None] = {}
    _walk(forward, module, "", found, set())
    return [path for path in found if "." in path]  # its own tensors come with its own hook


def _walk(function: Callable[..., Any], module: nn.Module, prefix: str, found: dict[str, None],
          seen: set[tuple[int, Callable[..., Any]]]) -> None:
    """Add to ``found`` every tensor path that ``function`` (run with ``self=module``) reads."""
    if (id(module), function) in seen:
        return
    seen.add((id(module), function))
    for kind, chain in _uses(function):
        node, depth = _resolve(module, chain)
        if depth:  # a tensor: read, unless only its metadata is looked at (self.proj.weight.dtype)
            if depth == len(chain) or chain[depth] not in _METADATA:
                found[prefix + ".".join(chain[:depth])] = None
            continue
        if not isinstance(node, nn.Module):
            continue
        # self.a.m(...) runs a method of submodule a other than forward (its hook does not fire);
        # self.a.p reads a property of a: follow them, as code run with self=a.
        if kind == "call":
            member = _own_attribute(type(node), chain[-1], None) if chain[-1] != "forward" else None
        else:
            prop = _own_attribute(type(node), chain[-1], property)
            member = prop.fget if prop is not None else None
        if member is not None:
            _walk(member, node, prefix + "".join(f"{c}." for c in chain[:-1]), found, seen)


def _resolve(module: nn.Module, chain: tuple[str, ...]) -> tuple[Any, int]:
    """Walk ``chain`` down the module tree: (the tensor, its depth) or (the last module reached, 0)."""
    node: nn.Module = module
    for i, attr in enumerate(chain):
        if attr in node._parameters or attr in node._buffers:
            tensor = node._parameters.get(attr, node._buffers.get(attr))
            return (tensor, i + 1) if tensor is not None else (None, 0)
        child = node._modules.get(attr)
        if child is None:
            return (node if i == len(chain) - 1 else None), 0
        node = child
    return None, 0


def _own_attribute(cls: type, name: str, kind: type | None) -> Any:
    """``name`` as defined by ``cls`` or a base other than ``nn.Module`` (``kind``: only of that type)."""
    for base in cls.__mro__:
        if base is nn.Module or base is object:
            return None
        if name in base.__dict__:
            value = base.__dict__[name]
            if kind is None:
                return value if inspect.isfunction(inspect.unwrap(value)) else None
            return value if isinstance(value, kind) else None
    return None


@functools.lru_cache(maxsize=4096)
def _uses(function: Callable[..., Any]) -> tuple[_Use, ...]:
    """Every ``self.x.y...`` chain ``function`` reads or calls, from its source (empty when unreadable)."""
    tree = _parse(inspect.unwrap(function))
    if tree is None or not tree.args.args:
        return ()
    found: list[_Use] = []
    for statement in tree.body:
        _collect(statement, tree.args.args[0].arg, None, found)
    return tuple(found)


def _parse(function: Any) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The syntax tree of ``function``, from the lines its code spans (``inspect.getsource`` is 10x slower)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    lines = linecache.getlines(code.co_filename)
    ends = [end for _, end, _, _ in code.co_positions() if end is not None] if hasattr(code, "co_positions") else []
    try:
        if lines and ends:
            source = "".join(lines[code.co_firstlineno - 1:max(ends)])
        else:
            source = inspect.getsource(function)
        module = ast.parse(textwrap.dedent(source))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    tree = module.body[0] if module.body else None
    return tree if isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _collect(node: ast.AST, self_name: str, above: ast.AST | None, found: list[_Use]) -> None:
    """Add the ``self.a.b...`` chains under ``node`` to ``found`` (``above``: the node holding ``node``)."""
    if isinstance(node, ast.Attribute):
        chain: list[str] = []
        inner: ast.AST = node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id == self_name:
            if isinstance(above, ast.Call) and above.func is node:
                found.append(("call", tuple(reversed(chain))))
            elif not (isinstance(above, ast.Call) and isinstance(above.func, ast.Name)
                      and above.func.id in _INSPECTING_CALLS):
                found.append(("read", tuple(reversed(chain))))
            return
        node = inner  # a chain on something else (a call's result...): look inside that
    for child in ast.iter_child_nodes(node):
        _collect(child, self_name, node, found)
