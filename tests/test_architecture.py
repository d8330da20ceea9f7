"""The house rules, read from the source: the library stands alone, no import cycles, no family-id literals.

Every module of glm_jax/, train/ and convert/ is parsed (AST); imports inside functions count. Imports under
`if TYPE_CHECKING:` are annotations only (never executed) and do not count. `from pkg import name` is an import
of `pkg.name` when that is a module, else of `pkg`.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from glm_jax import families

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("glm_jax", "train", "convert")
FAMILY_IDS = set(families.IDS)


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
    # a function-level import is read: train/verify.py imports the model inside check_loads
    assert "glm_jax.model.transformer" in GRAPH["train.verify"]


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


# ---------------------------------------------------------------- one home per concept
LAYOUT_HOME = "glm_jax.checkpoint.layout"
STACK_FOLDERS = ("layers", "dense_layers")  # glm_jax.checkpoint.layout.STACK_NAMES


def stack_folder_uses(source: str, filename: str = "<src>") -> list[str]:
    """Code that names a scan-stack folder: a literal "dense_layers", a path literal under a stack ("layers/..."),
    or "layers" as a params key (subscript, `in` test, dict key). The logical axis name "layers" (an argument of
    a partitioning rule or a tuple of axis names) is not a folder."""
    tree = ast.parse(source, filename)
    found = []

    def hit(node, why):
        found.append(f"{filename}:{node.lineno}: {why}: {ast.unparse(node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if v == "dense_layers" or v.startswith(tuple(f + "/" for f in STACK_FOLDERS)):
                hit(node, "stack folder literal")
        elif isinstance(node, ast.Subscript) and "layers" in _literals(node.slice):
            hit(node, "params key")
        elif isinstance(node, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn)) for o in node.ops):
            if "layers" in _literals(node.left):
                hit(node, "params key")
        elif isinstance(node, ast.Dict) and any(k is not None and "layers" in _literals(k) for k in node.keys):
            hit(node, "params key")
    return found


def test_only_the_layout_module_names_the_stack_folders():
    found = []
    for m, f in MODULES.items():
        if m != LAYOUT_HOME:
            found += stack_folder_uses(f.read_text(), str(f.relative_to(ROOT)))
    assert not found, f"ask {LAYOUT_HOME} instead:\n" + "\n".join(found)


# ---------------------------------------------------------------- a family is one module
def _collections_of_family_ids(source: str, filename: str) -> list[str]:
    """Tuple, list, set and dict-key literals (a Literal[...] included) that spell two or more family ids."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            ids = {e.value for e in elts if isinstance(e, ast.Constant)} & FAMILY_IDS
            if len(ids) >= 2:
                found.append(f"{filename}:{node.lineno}: {sorted(ids)}")
    return found


def test_family_ids_are_listed_once_in_the_registry():
    import typing

    from glm_jax import GLMConfig, config

    assert typing.get_args(config.FamilyId) == families.IDS == tuple(m.FAMILY.id for m in families._MODULES)
    for fid in families.IDS:
        assert GLMConfig(family=fid).family == fid
    with pytest.raises(config.ConfigError, match="family='glm5' is not one of"):
        GLMConfig(family="glm5")
    found = []
    for m, f in MODULES.items():
        if not m.startswith("glm_jax.families"):
            found += _collections_of_family_ids(f.read_text(), str(f.relative_to(ROOT)))
    assert not found, "list the family ids only in glm_jax/families/ (the registry):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "src,hit",
    [
        ('FamilyId = Literal["glm", "chatglm", "glm4"]', True),
        ('ok = {"glm-hf": 1, "glm4-moe": 2}', True),
        ('SYSTEM = ("chatglm3", "glm4", "glm4_5")', False),  # one id among chat-format names
    ],
)
def test_family_id_collection_finder(src, hit):
    assert bool(_collections_of_family_ids(src, "<src>")) == hit


def test_the_tokenizer_table_is_built_from_the_family_modules():
    from glm_jax.tokenizers import CHAT_FORMATS, loader

    declared = {t.name: t for m in families._MODULES for t in m.FAMILY.tokenizers}
    assert loader._FORMATS == declared == families.tokenizer_formats()
    assert set(CHAT_FORMATS) == {n for m in families._MODULES for n in m.FAMILY.chat_formats}
    for t in declared.values():  # what reads a format is the family module's business
        assert t.build.__module__.startswith("glm_jax.families."), (t.name, t.build.__module__)
    # and the loader names no format: no if-ladder over chat_format values
    tree = ast.parse(MODULES["glm_jax.tokenizers.loader"].read_text())
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not named & set(declared), sorted(named & set(declared))


def test_position_fields_are_read_without_string_tuples():
    """position_encoding (how positions enter) and position_rule (the default ids) are two typed fields; the model
    code compares each with one value or looks it up in a table, never tests membership in a tuple of names."""
    import typing

    from glm_jax import config
    from glm_jax.model import masks

    assert set(masks._POSITION_RULES) == set(typing.get_args(config.PositionRule))
    found = []
    for f in MODULES.values():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                text = ast.unparse(node)
                if ("position_encoding" in text or "position_rule" in text) and any(
                    _literals(c) for c in node.comparators
                ):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "src,hit",
    [
        ('k = params["layers"]', True),
        ('if "layers" not in params: pass', True),
        ('p = "dense_layers/block/mlp"', True),
        ('p = f"layers/{rest}"', True),
        ('out = {"layers": t}', True),
        ('rules = (("layers", None),)', False),
        ('meta = {nn.PARTITION_NAME: "layers"}', False),
        ('p = f"layers_{i}/block"', False),
    ],
)
def test_stack_folder_finder(src, hit):
    assert bool(stack_folder_uses(src)) == hit


QUANT_FORMATS = "glm_jax.quant.formats"


def nibble_and_dequantize_code(source: str, filename: str = "<src>") -> list[str]:
    """Code that unpacks or packs int4 nibbles (a shift by 4) or defines a dequantizing function."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.RShift, ast.LShift)):
            if isinstance(node.right, ast.Constant) and node.right.value == 4:
                found.append(f"{filename}:{node.lineno}: nibble shift {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("right_shift", "left_shift")):
            found.append(f"{filename}:{node.lineno}: nibble shift {ast.unparse(node)}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "dequantiz" in node.name.lower():
            found.append(f"{filename}:{node.lineno}: dequantizing function {node.name}")
    return found


def test_int4_unpacking_and_dequantizing_are_written_once():
    found = []
    for m, f in MODULES.items():
        if m != QUANT_FORMATS:
            found += nibble_and_dequantize_code(f.read_text(), str(f.relative_to(ROOT)))
    assert not found, f"ask {QUANT_FORMATS} (unpack_int4, dequantize):\n" + "\n".join(found)
    own = nibble_and_dequantize_code(MODULES[QUANT_FORMATS].read_text())
    assert sum("dequantizing function" in x for x in own) == 1, own


@pytest.mark.parametrize(
    "src,hit",
    [
        ("lo = (p << 4).astype(np.int8) >> 4", True),
        ("hi = jnp.right_shift(p, jnp.int8(4))", True),
        ("def _dequantized(q, s): return q * s", True),
        ("y = x >> 1", False),
        ("w = dequantize(q, s, 8)", False),
    ],
)
def test_nibble_finder(src, hit):
    assert bool(nibble_and_dequantize_code(src)) == hit
