"""The package's shape: stages in folders, lower layers never importing higher ones, no cycles, short functions.

The layers, lowest first (a module may import its own layer and those below):

    errors, progress, version, env  <  model  <  plan  <  storage  <  load  <  runtime  <  parallel  <  hf  <  cli

``import hf_bigmodel`` must not import transformers, diffusers or accelerate: the core knows none of them,
and the Hugging Face integration registers what it needs (``register_meta_build_context``,
``register_dispatch_step``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hf_bigmodel"
LAYERS = {
    "errors": 0, "progress": 0, "version": 0, "env": 0,
    "model": 1, "plan": 2, "storage": 3, "load": 4, "runtime": 5, "parallel": 6, "hf": 7, "cli": 8,
    "__init__": 9, "__main__": 9, "_api": 9,
}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: place its folder in LAYERS (tests/test_layering.py) and the docs"
    return LAYERS[top]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported hf_bigmodel module, at module level)`` for every import of the file (TYPE_CHECKING aside)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
    top = {id(n) for n in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join([*base, *([node.module] if node.module else [])])
        elif (node.module or "").startswith("hf_bigmodel"):
            target = node.module or ""
        else:
            continue
        for alias in node.names:  # "from . import x" may name a submodule
            candidate = f"{target}.{alias.name}"
            exists = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                PACKAGE.parent / candidate.replace(".", "/")).is_dir()
            found.append((candidate if exists else target, id(node) in top))
    return found


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
             for a, edges in _graph().items() for b, _ in edges if _layer(b) > _layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_inside_the_package() -> None:
    graph = {a: sorted({b for b, _ in edges if b != a}) for a, edges in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own submodules is how Python packages work, not a cycle of concepts
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "\n".join(" -> ".join(c) for c in real)


def test_only_the_command_line_defers_its_own_imports() -> None:
    """Function-level imports of the package's own modules hide cycles; only cli/ defers them (for a fast --help),
    and the package itself, whose public names load on first use."""
    deferred = [f"{a} imports {b} inside a function" for a, edges in _graph().items() if a != "hf_bigmodel"
                and not a.startswith("hf_bigmodel.cli") for b, at_top in edges if not at_top]
    assert not deferred, "\n".join(deferred)


def test_import_hf_bigmodel_imports_no_hugging_face_library() -> None:
    """``import hf_bigmodel`` loads nothing heavy (not even torch: ``hf-bigmodel --help`` is instant); the
    first public name loads the whole API, still without transformers, diffusers or accelerate."""
    code = (
        "import sys, hf_bigmodel\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'diffusers', 'accelerate'})\n"
        "print(heavy())\n"
        "hf_bigmodel.load_pretrained_dispatched, hf_bigmodel.init_empty_weights\n"
        "print(heavy(), len(hf_bigmodel.__all__) == len(set(hf_bigmodel.__all__) & set(dir(hf_bigmodel))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['torch'] True"]


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function, its docstring left out."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_80_lines(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = [f"{node.name}: {_code_lines(node)} lines" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(PACKAGE)}: split these into a pure plan and small steps: {', '.join(long)}"


_SLOT_TABLES = {"_parameters", "_buffers"}


def _slot_writes(tree: ast.AST) -> list[str]:
    """Writes into a module's tensor slots: ``m._parameters[k] = v`` (also through an alias of the table),
    ``p.data = v``, and ``Parameter(...)`` built by hand."""
    aliases = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Name) and any(
                   isinstance(n, ast.Attribute) and n.attr in _SLOT_TABLES for n in ast.walk(node.value))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            table = node.value
            if any(isinstance(n, ast.Attribute) and n.attr in _SLOT_TABLES for n in ast.walk(table)) or (
                    isinstance(table, ast.Name) and table.id in aliases):
                found.append(f"line {node.lineno}: {ast.unparse(node)} = ...")
        elif isinstance(node, ast.Attribute) and node.attr == "data" and isinstance(node.ctx, ast.Store):
            found.append(f"line {node.lineno}: {ast.unparse(node)} = ...")
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Parameter":
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_only_model_tensors_puts_tensors_into_module_slots() -> None:
    """One way to put a tensor in a slot (model/tensors.py), so a parameter keeps its class, attributes and flag."""
    writes = [f"{path.relative_to(PACKAGE)} {w}" for path in sorted(PACKAGE.rglob("*.py"))
              if path != PACKAGE / "model" / "tensors.py" for w in _slot_writes(ast.parse(path.read_text()))]
    assert not writes, "use hf_bigmodel.model.tensors (set_tensor, put_tensor, move_tensor):\n" + "\n".join(writes)


def test_only_env_reads_the_environment() -> None:
    """Settings are read by ``env.py`` alone (one parser, one error for a bad value); ``parallel/world.py``
    reads the launcher's own variables (``WORLD_SIZE``, ``RANK``...), which are not settings of ours."""
    readers = sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                     if "os.environ" in f.read_text() or "os.getenv" in f.read_text())
    assert readers == ["env.py", "parallel/world.py"], readers


def test_the_checks_above_can_fail(tmp_path: Path) -> None:
    """The parser sees relative imports, function-level ones, and TYPE_CHECKING blocks as they are."""
    sample = PACKAGE / "model" / "_layering_probe.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\nfrom ..runtime import hooks\nif TYPE_CHECKING:\n    from ..hf import hub\n"
        "def f():\n    from ..plan import devices\n"
    )
    try:
        edges = _imports(sample)
    finally:
        sample.unlink()
    assert ("hf_bigmodel.runtime.hooks", True) in edges
    assert ("hf_bigmodel.plan.devices", False) in edges
    assert not any("hub" in b for b, _ in edges)
    writes = _slot_writes(ast.parse(
        "m._parameters['w'] = p\nstore = m._buffers if b else m._parameters\nstore[k] = v\n"
        "p.data = t\nnn.Parameter(t)\nx = m._parameters['w']\n(m._buffers if b else m._parameters)[k] = v\n"))
    assert sorted(w.split(":")[0] for w in writes) == ["line 1", "line 3", "line 4", "line 5", "line 7"]
