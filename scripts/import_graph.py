"""Prints the ramstage package's import graph as the Markdown list docs/architecture.md holds:
one line per module, leaves first, each with the ramstage modules it imports.

    .venv/bin/python scripts/import_graph.py            # print it
    .venv/bin/python scripts/import_graph.py --update   # write it into docs/architecture.md

tests/unit/test_architecture.py fails when the document and this output differ.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "ramstage"
DOC = REPO / "docs" / "architecture.md"
BLOCK = re.compile(r"(<!-- import graph: begin -->\n).*?(<!-- import graph: end -->)", re.S)


def modules() -> dict[str, Path]:
    """Dotted names below the package, without the "ramstage." prefix."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts != ("__main__",):
            found[".".join(parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules this one imports (type-checking imports included)."""
    wanted: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module.removeprefix("ramstage").lstrip(".")
            if not node.module.startswith("ramstage"):
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                wanted.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ramstage."):
                    wanted.add(alias.name.removeprefix("ramstage."))
    return {name for name in wanted if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules by depth: a module's layer is one more than the deepest it imports."""
    depth: dict[str, int] = {}

    def of(name: str, trail: tuple[str, ...] = ()) -> int:
        if name not in depth:
            if name in trail:
                raise SystemExit(f"import cycle: {' -> '.join((*trail, name))}")
            depth[name] = 1 + max((of(n, (*trail, name)) for n in edges[name]), default=-1)
        return depth[name]

    for name in edges:
        of(name)
    return [sorted(n for n in edges if depth[n] == d) for d in range(max(depth.values()) + 1)]


def render() -> str:
    edges = graph()
    lines = []
    for number, layer in enumerate(layers(edges)):
        lines.append(f"Layer {number}:")
        for name in layer:
            uses = ", ".join(sorted(edges[name])) or "(nothing of ramstage)"
            lines.append(f"- `{name}` → {uses}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        graph = render()
        DOC.write_text(BLOCK.sub(lambda m: m.group(1) + graph + "\n" + m.group(2), DOC.read_text()))
    else:
        sys.stdout.write(render() + "\n")
