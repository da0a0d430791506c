"""lorakit's layers and the one rule between them: a module imports only from its own layer or a lower one,
and the module graph has no cycle.

    python -m lorakit.layering          # prints each layer's imports of the layers below; exits 1 on a violation

    core ← methods ← files ← model ← registry ← train ← serve ← http ← ui ← cli

- core: errors, routing and the adapter set, quantization helpers, the fused ops — what every layer uses;
- methods: the adapter methods (one folder each) and target matching;
- files: PEFT's on-disk format, fingerprints, reading and writing adapters;
- model: the PEFT-style model (PeftModel, the tuner), loading bases, status, merging to a folder;
- registry: adapter versions, aliases, promotion; train: the job; serve: the engine;
- http: the OpenAI-compatible server; ui: the dashboard; cli: the `lorakit` command.

Every import counts — also one inside a function, which is how a cycle usually hides; only imports
under `if TYPE_CHECKING:` (annotations) do not. tests/test_layering.py runs `check()`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# layer → the modules and packages in it (a package: every module under it)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("errors", "version", "filemode", "quiet", "routing", "adapters", "layer_shapes", "compile", "fused_loss",
              "tool_calls",
              "optim", "plan", "quant", "layering")),
    ("methods", ("methods", "targets")),
    ("files", ("files",)),
    ("model", ("", "tuner", "model", "loading", "base_models", "status", "footprint", "merge_to_dir")),
    ("registry", ("registry",)),
    ("train", ("train",)),
    ("serve", ("serve",)),
    ("http", ("http",)),
    ("ui", ("ui",)),
    ("cli", ("cli", "__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("lorakit", *parts)).removesuffix(".__init__")


def layer_of(module: str) -> int:
    """The index in LAYERS of `module` ("lorakit.serve.engine"); the longest matching entry wins."""
    short = module.removeprefix("lorakit").removeprefix(".")
    best, depth = None, -1
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if (short == member or short.startswith(member + ".") or (member == "" and short == "")) and \
                    len(member) > depth:
                best, depth = index, len(member)
    if best is None:
        raise KeyError(f"{module} is in no layer of lorakit.layering.LAYERS; add it to one")
    return best


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lorakit modules `path` imports (the module itself, when `from x import name` names a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lorakit"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lorakit"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    resolved = set()
    for name in found:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules:
            resolved.add(name)
    return resolved


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in sorted(paths.items())}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or not (strongly connected components of two or
    more). A package's `__init__` re-exporting its own modules is not a cycle — a package is imported before
    its modules — so an edge from a package into itself is left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def problems(edges: dict[str, set[str]] | None = None) -> list[str]:
    edges = graph() if edges is None else edges
    found = []
    for module, deps in edges.items():
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module):
                found.append(f"upward import: {module} ({LAYERS[layer_of(module)][0]}) imports {dep} "
                             f"({LAYERS[layer_of(dep)][0]})")
    found += [f"import cycle among: {', '.join(group)}" for group in cycles(edges)]
    return found


def check() -> None:
    found = problems()
    if found:
        raise AssertionError("lorakit's layering is broken:\n  " + "\n  ".join(found))


def main() -> int:
    edges = graph()
    for index, (layer, _) in enumerate(LAYERS):
        below = sorted({LAYERS[layer_of(d)][0] for m, deps in edges.items() if layer_of(m) == index for d in deps
                        if layer_of(d) < index}, key=lambda name: [n for n, _ in LAYERS].index(name))
        count = sum(layer_of(m) == index for m in edges)
        print(f"{layer:9} {count:3} modules  imports: {', '.join(below) or '-'}")
    found = problems(edges)
    for problem in found:
        print(problem)
    print("ok: every import points down or sideways, no cycle" if not found else f"{len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
