"""docs/architecture.md against the tree: the module list and the import graph must match the
code, the vocabulary stays a leaf, and modules and functions stay small."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
GRAPH = re.compile(r"<!-- import graph: begin -->\n(.*?)<!-- import graph: end -->", re.S)


def generated_graph() -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_graph.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def tree_modules() -> set[str]:
    return set(re.findall(r"^- `([\w.]+)`", generated_graph(), re.M))


def test_the_module_list_matches_the_tree():
    listed = set(re.findall(r"^\| `([\w.]+)` \|", DOC.read_text(), re.M))
    assert listed == tree_modules()


def test_the_import_graph_matches_the_code():
    found = GRAPH.search(DOC.read_text())
    assert found is not None, "no import graph block in docs/architecture.md"
    assert found.group(1) == generated_graph(), (
        "run: .venv/bin/python scripts/import_graph.py --update"
    )


def test_the_vocabulary_is_a_leaf():
    line = next(x for x in generated_graph().splitlines() if x.startswith("- `model`"))
    assert line == "- `model` → (nothing of ramstage)"


def test_modules_and_functions_stay_small():
    long_functions = []
    for path in (REPO / "ramstage").rglob("*.py"):
        lines = path.read_text().count("\n")
        assert lines <= 400, f"{path.name}: {lines} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > 60:
                    long_functions.append(f"{path.stem}.{node.name}: {length} lines")
    assert long_functions == []
    assert (REPO / "ramstage" / "daemon.py").read_text().count("\n") < 300
