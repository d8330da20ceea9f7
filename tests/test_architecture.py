"""The house rules, read from the source: the library stands alone, no import cycles, no family-id literals.

Every module of glm_jax/, train/ and convert/ is parsed (AST); imports inside functions count. Imports under
`if TYPE_CHECKING:` are annotations only (never executed) and do not count. `from pkg import name` is an import
of `pkg.name` when that is a module, else of `pkg`.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("glm_jax", "train", "convert")
FAMILY_IDS = {"glm", "chatglm", "chatglm2", "glm-hf", "glm4", "glm4-moe"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree):
    """ast.walk, minus the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports (at any depth of its code, TYPE_CHECKING blocks excepted)."""
    f = MODULES[module]
    tree = ast.parse(f.read_text(), str(f))
    out = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, f.name == "__init__.py", node)
            names = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES and n in MODULES)
    out.discard(module)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert len(MODULES) > 40
    assert "glm_jax.families" in GRAPH["glm_jax.config"]
    assert "glm_jax.checkpoint.hf" in GRAPH["convert.importer"]
    # a function-level import is read: GLMConfig.num_params imports the model inside the method
    assert "glm_jax.model.transformer" in GRAPH["glm_jax.config"]


def test_library_imports_no_application():
    bad = sorted(
        (m, i)
        for m, deps in GRAPH.items()
        if m.startswith("glm_jax")
        for i in deps
        if i.startswith(("train", "convert"))
    )
    assert not bad, f"glm_jax imports its applications: {bad}"


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _literals(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_literals(e) for e in node.elts)) if node.elts else set()
    return set()


def family_literal_comparisons(source: str, filename: str = "<src>") -> list[str]:
    """Comparisons of a family id (an expression naming `family` or `layout`) with a family-id literal."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        lits = set().union(*(_literals(s) for s in sides))
        named = any(
            "family" in ast.unparse(s).lower() or "layout" in ast.unparse(s).lower() for s in sides if not _literals(s)
        )
        if lits & FAMILY_IDS and named:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_family_literal_comparisons_outside_families():
    found = []
    for m, f in MODULES.items():
        if m.startswith("glm_jax.families"):
            continue
        found += family_literal_comparisons(f.read_text(), str(f.relative_to(ROOT)))
    assert not found, "compare a family id with a literal only in glm_jax/families/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "src,hit",
    [
        ('if cfg.family == "chatglm": pass', True),
        ('x = (layout or cfg.family) == "glm"', True),
        ('ok = tcfg.family in ("glm-hf", "glm4")', True),
        ('ok = family != "glm4"', True),
        ('ok = cfg.norm == "layernorm"', False),
        ("ok = tcfg.family == ck.cfg.family", False),
    ],
)
def test_family_literal_finder(src, hit):
    assert bool(family_literal_comparisons(src)) == hit


def test_no_module_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in MODULES.values() if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
