"""The import graph of align: no import cycles, no private names imported across modules.

Every module under align/ is parsed with ``ast`` (nothing is imported), and every import is an
edge, wherever it stands: at the top, inside a function (a lazy import still closes a cycle
when it runs), or under ``if TYPE_CHECKING``. ``from align.a import b`` is an edge to the
module ``align.a.b`` when there is one, else to ``align.a``.

What other parts of the package still do is listed below, each group with a comment on what
it is (other issues will remove them). The lists are a ratchet: a violation not listed fails
the test, and so does a listed one that has gone (delete its entry), so they only shrink.
align.merging has none, and no private imports are left anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "align"

#: Import edges that lie on a cycle (both ends in one strongly connected component).
ALLOWED_CYCLE_EDGES = {
    # align.adapters: the package imports its tuners and registry, and the PBLoRA reference
    # reader lazily imports align.adapters.loading, which imports the package back (to
    # register the tuners with PEFT); PBLoRA's config lazily imports that reference reader,
    # which imports the config back.
    ("align.adapters", "align.adapters.pblora"),
    ("align.adapters", "align.adapters.registry"),
    ("align.adapters.loading", "align.adapters"),
    ("align.adapters.pblora", "align.adapters.pblora.config"),
    ("align.adapters.pblora", "align.adapters.pblora.model"),
    ("align.adapters.pblora.config", "align.adapters.pblora.reference"),
    ("align.adapters.pblora.model", "align.adapters.pblora.config"),
    ("align.adapters.pblora.reference", "align.adapters.loading"),
    ("align.adapters.pblora.reference", "align.adapters.pblora.config"),
    ("align.adapters.registry", "align.adapters.pblora"),
}

#: ``(importer, module, name)``: a ``_private`` name imported from another align module. None
#: are left: a name another module needs is public in the module that defines it.
ALLOWED_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], set[tuple[str, str, str]]]:
    """The module graph (align modules only), and the private names (``(importer, module,
    name)``) and private modules (``(importer, module, "")``) imported across modules."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private: set[tuple[str, str, str]] = set()
    for importer, path in modules.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:  # relative: from the importer's package, up level - 1
                    parts = package.split(".")
                    base = parts[: len(parts) - node.level + 1]
                    source = ".".join([*base, source] if source else base)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        targets.append(f"{source}.{alias.name}")
                    else:
                        targets.append(source)
                        if _private(alias.name) and source in modules and source != importer:
                            private.add((importer, source, alias.name))
            for target in targets:
                if target not in modules or target == importer:
                    continue
                edges[importer].add(target)
                parts = target.split(".")
                first = next((i for i, part in enumerate(parts) if _private(part)), None)
                # A private module is for its own package (align/__init__ imports align._quiet).
                if first is not None and not (importer + ".").startswith(
                    ".".join(parts[:first]) + "."
                ):
                    private.add((importer, target, ""))
    return edges, private


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _cycle_edges(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    found = set()
    for component in _strongly_connected(edges):
        for a in component:
            found.update((a, b) for b in edges[a] if b in component)
    return found


def _ratchet(found: set, allowed: set, what: str) -> None:
    new, gone = sorted(found - allowed), sorted(allowed - found)
    assert not new and not gone, (f"new {what} (remove them): {new}; " if new else "") + (
        f"allowlisted {what} that are gone (delete their entries): {gone}" if gone else ""
    )


def test_the_graph_sees_what_is_there(tmp_path):
    """The parser finds the imports the checks rely on (a check that sees nothing passes)."""
    edges, _ = _imports(_modules())
    assert "align.merging.base" in edges["align.merging.engine"]
    assert "align.merging.engine" in edges["align.merging.methods.ties"]
    assert "align.merging.lora" in edges["align.merging"]  # ``from ... import`` of a module
    assert "align.decoding.forwards" in edges["align.decoding.batch"]
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert _cycle_edges(toy) == {("a", "b"), ("b", "c"), ("c", "a")}
    # Private names and modules, on a toy package (align's own has none left to find).
    sources = {
        "align.a": "from align.b import _helper, public\nimport align.p._hidden\n",
        "align.b": "def _helper(): ...\ndef public(): ...\n",
        "align.p._hidden": "",
        "align.p.c": "from align.p import _hidden\nfrom . import _hidden as again\n",
    }
    files = {}
    for name, text in sources.items():
        files[name] = tmp_path / f"{name}.py"
        files[name].write_text(text)
    _, private = _imports(files)
    assert private == {("align.a", "align.b", "_helper"), ("align.a", "align.p._hidden", "")}


def test_no_import_cycles_among_align_modules():
    edges, _ = _imports(_modules())
    found = _cycle_edges(edges)
    assert not {edge for edge in found if any(m.startswith("align.merging") for m in edge)}
    _ratchet(found, ALLOWED_CYCLE_EDGES, "import-cycle edges")


def test_no_private_names_imported_across_align_modules():
    _, private = _imports(_modules())
    assert not {entry for entry in private if entry[0].startswith("align.merging")}
    _ratchet(private, ALLOWED_PRIVATE_IMPORTS, "private imports")
