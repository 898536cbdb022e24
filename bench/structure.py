"""The package's structure as numbers: modules, lines, import arrows, circles, what ``train(cfg)`` reaches.

Read from the source alone (``ast``), nothing is imported or run, so it works on any checkout or commit:

    python bench/structure.py                      # this checkout
    python bench/structure.py --rev HEAD~5         # a commit, read from git without checking it out

An arrow ``a -> b`` is an import of gptmini module ``b`` anywhere in module ``a`` (a function-level import
counts too: it is still a dependency). A circle is a group of modules that import each other (a strongly
connected component of more than one module). "Reached by train" is every module ``gptmini.training.run``
imports, directly or not: the rooms a training run walks through. Code lines leave out blank lines, comments
and docstrings. Prints a table per sub-package, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gptmini"


def read_sources(rev: str | None) -> dict[str, str]:
    """``{module name: source}`` for every .py file of the package, from the work tree or a git commit."""
    if rev is None:
        files = sorted((REPO_ROOT / PACKAGE).rglob("*.py"))
        return {module_name(path.relative_to(REPO_ROOT).as_posix()): path.read_text() for path in files}
    listing = git("ls-tree", "-r", "--name-only", rev, PACKAGE).splitlines()
    return {module_name(path): git("show", f"{rev}:{path}") for path in listing if path.endswith(".py")}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(module: str, source: str, known: set[str]) -> set[str]:
    """The gptmini modules that ``module`` imports (``from pkg import name`` counts ``pkg.name`` if that is
    a module, else ``pkg``)."""
    found = set()
    is_package = any(other.startswith(module + ".") for other in known)  # a folder's __init__.py
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(module, node, is_package)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            names = [name if name in known else base for name in submodules]
        else:
            continue
        found.update(nearest_module(name, known) for name in names if name.split(".")[0] == PACKAGE)
    found.discard(module)
    found.discard(None)
    return found


def resolve_relative(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def nearest_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def code_lines(source: str) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    lines = set()
    docstrings = {
        node.body[0].value.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    skip.add(tokenize.ENDMARKER)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in skip or (token.type == tokenize.STRING and token.start[0] in docstrings):
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reached_from(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen or node not in graph:
            continue
        seen.add(node)
        todo.extend(graph[node])
    return seen


def measure(rev: str | None) -> dict:
    sources = read_sources(rev)
    known = set(sources)
    graph = {module: imports_of(module, source, known) for module, source in sources.items()}
    rooms = defaultdict(lambda: {"modules": 0, "lines": 0, "code_lines": 0})
    for module, source in sources.items():
        room = ".".join(module.split(".")[:2]) if module.count(".") >= 2 else PACKAGE
        rooms[room]["modules"] += 1
        rooms[room]["lines"] += len(source.splitlines())
        rooms[room]["code_lines"] += code_lines(source)
    train_path = reached_from("gptmini.training.run", graph)
    return {
        "rev": rev or "work tree",
        "modules": len(sources),
        "lines": sum(room["lines"] for room in rooms.values()),
        "code_lines": sum(room["code_lines"] for room in rooms.values()),
        "arrows": sum(len(targets) for targets in graph.values()),
        "circles": circles(graph),
        "train_reaches": len(train_path),
        "train_path": sorted(train_path),
        "rooms": dict(sorted(rooms.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git commit to read instead of the work tree")
    result = measure(parser.parse_args().rev)
    print(f"gptmini at {result['rev']}")
    print(f"{'room':<22}{'modules':>8}{'lines':>8}{'code':>8}")
    for room, figures in result["rooms"].items():
        print(f"{room:<22}{figures['modules']:>8}{figures['lines']:>8}{figures['code_lines']:>8}")
    print(f"{'total':<22}{result['modules']:>8}{result['lines']:>8}{result['code_lines']:>8}")
    print(f"import arrows: {result['arrows']}; circles: {len(result['circles'])} {result['circles'] or ''}")
    print(f"train(cfg) reaches {result['train_reaches']} of {result['modules']} modules")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
