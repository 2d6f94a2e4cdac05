"""The layout's rules, checked on the source: imports run one way, no import circle, the library
never imports its tools, files and functions stay small, requirements match the imports."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "pkd_jax"
TOOLS = ("pkd_jax.report", "pkd_jax.advise")  # on top of the library, like benchmarks/ and scripts/
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from pkd_jax import data
    return names


def _library_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # A package's own __init__ importing its submodules is its interface, not a dependency.
        deps = {d for d in _imports(path) if d in files and d != name and not d.startswith(name + ".")}
        graph[name] = deps
    return graph


def _is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


def test_no_import_circle():
    graph = _library_graph()
    done, stack = set(), []

    def visit(module):
        if module in stack:
            pytest.fail("import circle: " + " -> ".join(stack[stack.index(module):] + [module]))
        if module in done:
            return
        stack.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_library_imports_no_tool():
    for module, deps in _library_graph().items():
        if _is_tool(module):
            continue
        bad = [d for d in deps if _is_tool(d)]
        assert not bad, f"{module} imports the tool(s) {bad}"
    for path in LIBRARY.rglob("*.py"):
        assert not any(i == "benchmarks" or i.startswith("benchmarks.") for i in _imports(path)), path


def _python_files():
    yield from LIBRARY.rglob("*.py")
    yield from (REPO / "benchmarks").rglob("*.py")
    yield REPO / "run.py"


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for path in _python_files():
        text = path.read_text()
        if path.is_relative_to(LIBRARY) and text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def _requirements(file: str) -> set[str]:
    names = set()
    for line in (REPO / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[ ;]", line)[0].lower().replace("_", "-"))
    return names


# Imported by the library only when a user needs them, with a message saying what to install:
# TFDS for data_source=tfds, torch to read a pytorch_model.bin without safetensors.
OPTIONAL = {"tensorflow_datasets", "torch"}


def _third_party(paths, skip=()) -> set[str]:
    """Distributions that provide the top-level modules these files import."""
    providers = importlib.metadata.packages_distributions()
    local = {"pkd_jax", "configs", "benchmarks", "tests", "conftest", *(p.stem for p in (REPO / "scripts").glob("*.py"))}
    found = set()
    for path in paths:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in local or top in skip or top == "__future__":
                continue
            dists = providers.get(top)
            assert dists, f"{path.relative_to(REPO)} imports {top}, which no installed distribution provides"
            found.add(dists[0].lower().replace("_", "-"))
    return found




def test_runtime_requirements_are_exactly_what_the_code_imports():
    runtime = [*LIBRARY.rglob("*.py"), REPO / "run.py", *(REPO / "configs").glob("*.py")]
    imported = _third_party(runtime, skip=OPTIONAL)
    # jaxlib comes with jax; a requirement of its own would pin what jax[cuda]/jax[tpu] install.
    imported.discard("jaxlib")
    assert imported == _requirements("requirements.txt"), (
        f"imported, not required: {sorted(imported - _requirements('requirements.txt'))}; "
        f"required, not imported: {sorted(_requirements('requirements.txt') - imported)}")


# pytest plugins that `make test` runs with: required, never imported.
PLUGINS = {"pytest-xdist"}


def test_test_requirements_are_what_tests_and_benchmarks_add():
    extra = _third_party([*(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").rglob("*.py"),
                          *(REPO / "scripts").glob("*.py")], skip={"tensorflow_datasets"})
    extra -= _requirements("requirements.txt") | {"jaxlib"}
    assert extra | PLUGINS == _requirements("requirements-test.txt"), extra
    assert "-n $(TEST_WORKERS)" in (REPO / "Makefile").read_text()  # xdist: the one plugin
