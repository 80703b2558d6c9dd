"""The project's own files stay in step: environment.yml mirrors pyproject.toml; the package
keeps its layers, its sizes and its parts' contract."""

import re
import sys
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
    pip_only = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    conda |= {_name(d) for d in pip_only if not d.startswith("-e")}
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


SRC = ROOT / "src" / "pneumo"
# The layers, lowest first: a module imports only from its own layer or those below it. "shared"
# is the package's top-level modules (errors, io, boxes, metrics, config, ...); "commands" the CLI.
LAYERS = ["shared", "data", "models", "training", "deploy", "sweeps", "commands"]
COMMANDS = {"cli", "__main__"}


def _package_modules() -> dict:
    """{dotted name below pneumo: parsed module}, every module of every subpackage."""
    import ast

    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = ast.parse(path.read_text())
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, counting imports inside functions."""
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
                if not target.startswith("pneumo."):
                    continue
                parts = target.split(".")[1:]
                # the longest dotted prefix that is a module of the package
                for n in range(len(parts), 0, -1):
                    candidate = ".".join(parts[:n])
                    if candidate in modules and candidate != name:
                        graph[name].add(candidate)
                        break
    return graph


def _layer(module: str) -> str:
    head = module.split(".")[0]
    if head in COMMANDS:
        return "commands"
    return head if head in LAYERS else "shared"


def test_the_tree_shows_the_layers():
    subpackages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(LAYERS) - {"shared", "commands"}


def test_no_module_imports_a_layer_above_its_own():
    """A module imports only from its own layer or the layers below (imports inside functions count)."""
    against = [f"{module} ({_layer(module)}) imports {imported} ({_layer(imported)})"
               for module, imported_modules in _import_graph().items() for imported in imported_modules
               if LAYERS.index(_layer(imported)) > LAYERS.index(_layer(module))]
    assert not against, "; ".join(sorted(against))


def test_no_import_cycles_inside_the_package():
    """One owner per idea: two modules importing each other (even inside functions) are one idea
    split badly. A depth-first walk names the first cycle it meets. A package's __init__ importing
    its own modules (the heads' registration) is not a cycle."""
    graph = _import_graph()
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            assert state.get(imported) != "open", \
                "import cycle: " + " -> ".join(path[path.index(imported):] + [imported])
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_layer_check_catches_an_import_against_the_order(tmp_path, monkeypatch):
    """The check above can fail: a data module importing the models layer is named."""
    import ast

    fake = dict(_package_modules())
    fake["data.bad"] = ast.parse("def f():\n    from pneumo.models.net import build_net\n")
    monkeypatch.setattr(sys.modules[__name__], "_package_modules", lambda: fake)
    graph = _import_graph()
    assert "models.net" in graph["data.bad"] and _layer("data.bad") == "data"
    assert LAYERS.index(_layer("models.net")) > LAYERS.index(_layer("data.bad"))


def test_no_head_name_is_compared_outside_its_module():
    """A head is asked, never named: no `head == "..."` or `.head != ...` outside pneumo.models.heads."""
    import re

    pattern = re.compile(r"""head\s*[!=]=\s*["']|["']\s*[!=]=\s*\w*\.?head\b|\.head\s+in\s""")
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if "heads" not in p.parts and pattern.search(p.read_text())]
    assert not offenders, offenders


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
