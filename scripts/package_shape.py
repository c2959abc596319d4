"""
The package's shape, for the before/after of a refactor: lines per module, the longest functions, and the import
graph between the package's modules (lazy imports inside functions included) with its cycles.

    python scripts/package_shape.py [--root modeling_mpsm] [--top 10]
"""

import argparse
import ast
from pathlib import Path


def module_name(path, root):
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree, name, is_package, known):
    """The package modules `name` imports, at the top or inside functions."""
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(candidate for candidate in candidates if candidate in known and candidate != name)
    return found


def cycles(graph):
    """Every elementary cycle's node set, found by a depth-first search from each node (small graphs)."""
    found = set()

    def visit(start, node, path):
        for target in graph.get(node, ()):
            if target == start:
                found.add(tuple(sorted(path)))
            elif target not in path and target > start:
                visit(start, target, path + [target])

    for start in graph:
        visit(start, start, [start])
    return sorted(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="modeling_mpsm")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    files = sorted(root.rglob("*.py"))
    trees = {path: ast.parse(path.read_text()) for path in files}
    names = {path: module_name(path, root) for path in files}
    known = set(names.values())
    lines = {path: len(path.read_text().splitlines()) for path in files}
    print(f"{sum(lines.values())} lines in {len(files)} modules under {args.root}")
    for path in sorted(files, key=lines.get, reverse=True)[: args.top]:
        print(f"  {lines[path]:5d}  {path.relative_to(root.parent)}")
    functions = [
        (node.end_lineno - node.lineno + 1, f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
        for path, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    print(f"longest functions (lines, with docstrings):")
    for length, where in sorted(functions, reverse=True)[: args.top]:
        print(f"  {length:5d}  {where}")
    graph = {
        names[path]: sorted(imported_modules(tree, names[path], path.name == "__init__.py", known))
        for path, tree in trees.items()
    }
    loops = cycles(graph)
    print(f"import cycles between package modules: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))


if __name__ == "__main__":
    main()
