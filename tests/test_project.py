"""The project's own files stay in step: environment.yml mirrors pyproject.toml."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # conda-forge names that differ from PyPI


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert {CONDA_NAMES.get(n, n) for n in wanted} == conda


def test_outputs_dir_is_in_git_but_empty():
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "outputs/*" in ignore and "!outputs/README.md" in ignore


def test_one_version_string():
    import importlib.metadata

    import pneumo

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pneumo.__version__"}
    assert importlib.metadata.version("pneumo") == pneumo.__version__


def _package_modules() -> dict:
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "pneumo"
    return {p.stem: ast.parse(p.read_text()) for p in src.glob("*.py")}


def test_no_import_cycles_inside_the_package():
    """One owner per idea: two modules importing each other (even inside functions) are one idea
    split badly. A depth-first walk names the first cycle it meets."""
    import ast

    modules = _package_modules()
    graph = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                parts = target.split(".")
                if parts[0] == "pneumo" and len(parts) > 1 and parts[1] in modules and parts[1] != name:
                    graph[name].add(parts[1])
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            assert state.get(imported) != "open", "import cycle: " + " -> ".join(path[path.index(imported):] + [imported])
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_modules_functions_and_classes_stay_small():
    """The sizes the architecture keeps (docs/architecture.md): a module about 400 lines at most,
    a function 60 (the CLI's argument table aside), a class 150."""
    import ast

    too_big = []
    for name, tree in _package_modules().items():
        lines = max((getattr(n, "end_lineno", 0) or 0) for n in ast.walk(tree))
        if lines > 420:
            too_big.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60 and node.name != "build_parser":
                too_big.append(f"function {name}.{node.name}: {size} lines")
            if isinstance(node, ast.ClassDef) and size > 150:
                too_big.append(f"class {name}.{node.name}: {size} lines")
    assert not too_big, "; ".join(too_big)
