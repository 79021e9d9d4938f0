"""The house's layout: no import circles among modpo_pipe's modules, and every import points down the tiers
(docs/architecture.md). Imports inside functions count as much as those at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "modpo_pipe"

# Top to bottom. A module imports modules of its own tier or of lower ones, never of a higher one; a package
# (generate/) is one module here.
TIERS = [
    ("entry", {"__main__", "cli", "cli_options", "launcher", "supervise", "api"}),
    ("commands", {"rounds", "status", "demo", "evaluate", "soup", "summary"}),
    ("stages", {"generate", "score", "train", "shards", "parts"}),
    ("ground", {"schema", "models", "storage", "runstate", "prompts", "rewards", "reward_http", "reward_stats",
                "config", "roles", "values", "tracking", "modelcard", "embedded", "builtin_rewards"}),
    ("math", {"losses", "logprobs", "errors", "__init__"}),
]
TIER = {module: depth for depth, (_, modules) in enumerate(TIERS) for module in modules}


def module_name(path: Path) -> str:
    """modpo_pipe/x.py -> x; modpo_pipe/generate/hf.py -> generate; modpo_pipe/__init__.py -> __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """Our modules a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports: write them as modpo_pipe.x"
            if node.module == "modpo_pipe":  # from modpo_pipe import x, __version__
                found |= {a.name if a.name in known else "__init__" for a in node.names}
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            head, _, rest = name.partition(".")
            if head == "modpo_pipe":
                found.add(rest.partition(".")[0] if rest else "__init__")
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {name: set() for name in known}
    for f in files:
        name = module_name(f)
        graph[name] |= imported_modules(ast.parse(f.read_text(encoding="utf-8")), known) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # visiting | done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "visiting"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "visiting":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert {"config", "errors"} <= graph["cli"]  # at the top of cli.py
    assert {"rounds", "status", "train"} <= graph["cli"]  # inside its command functions
    assert "logprobs" in graph["generate"]  # from generate/hf.py


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import circle: {' -> '.join(find_cycle(import_graph()))}"


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_tier_and_imports_point_down():
    graph = import_graph()
    assert set(graph) <= set(TIER), f"place these modules in a tier: {sorted(set(graph) - set(TIER))}"
    upward = [f"{a} ({TIERS[TIER[a]][0]}) imports {b} ({TIERS[TIER[b]][0]})"
              for a in sorted(graph) for b in sorted(graph[a]) if TIER[b] < TIER[a]]
    assert not upward, "imports pointing up: " + "; ".join(upward)


def package_graph(package: Path) -> dict[str, set[str]]:
    """The modules of one package (its face: __init__) and which of them each imports, anywhere in it."""
    face = "modpo_pipe." + ".".join(package.relative_to(PACKAGE).parts)
    graph: dict[str, set[str]] = {f.stem: set() for f in package.glob("*.py")}
    for f in package.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == face:
                    graph[f.stem].add("__init__")
                elif name.startswith(face + ".") and name.removeprefix(face + ".").split(".")[0] in graph:
                    graph[f.stem].add(name.removeprefix(face + ".").split(".")[0])
            graph[f.stem].discard(f.stem)
    return graph


def test_no_import_cycle_inside_a_package_face_included():
    """A package's face (__init__.py) imports its modules; a module that imports the face back is a circle that
    only the order of imports keeps working (generate's samplers take Sample from generate/sampling.py)."""
    packages = sorted({init.parent for init in PACKAGE.rglob("__init__.py")} - {PACKAGE})
    assert {p.name for p in packages} >= {"generate", "train"}
    for package in packages:
        graph = package_graph(package)
        assert find_cycle(graph) is None, f"{package.name}: import circle: {' -> '.join(find_cycle(graph))}"
    assert "sampling" in package_graph(PACKAGE / "generate")["hf"]  # the graph sees imports of a sibling
