"""docs/ARCHITECTURE.md names every module of common/ and nothing that is not there: each module
file, and each ``Class.method`` it writes in backticks, is checked against the code."""
import ast
import os
import re

from helpers import ROOT

DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
COMMON = os.path.join(ROOT, "common")


def _doc() -> str:
    with open(DOC) as fh:
        return fh.read()


def _modules() -> list[str]:
    """Every module of common/ as a path under it (``web/routes.py``), packages' __init__ aside."""
    found = []
    for folder, _, files in os.walk(COMMON):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                found.append(os.path.relpath(os.path.join(folder, name), COMMON))
    return sorted(found)


def _definitions() -> dict[str, set[str]]:
    """Class name -> its methods and class-level names, over every module of common/."""
    classes: dict[str, set[str]] = {}
    for module in _modules():
        with open(os.path.join(COMMON, module)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names = classes.setdefault(node.name, set())
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
    return classes


def test_every_module_of_common_is_named():
    doc = _doc()
    missing = [m for m in _modules() if os.path.basename(m) not in doc]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"


def test_every_module_path_it_names_exists():
    doc = _doc()
    named = set(re.findall(r"common/([\w/]+\.py)", doc))
    named |= {f"{folder}/{name}" for folder, name in
              re.findall(r"`(web|inference|versions)/([\w/]+\.py)", doc)}
    missing = sorted(p for p in named if not os.path.exists(os.path.join(COMMON, p)))
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_class_method_it_names_exists():
    classes = _definitions()
    named = set(re.findall(r"`([A-Z]\w+)\.(\w+)", _doc()))
    wrong = sorted(f"{cls}.{name}" for cls, name in named
                   if cls in classes and name not in classes[cls])
    unknown = sorted(cls for cls, _ in named if cls not in classes)
    assert not wrong, f"docs/ARCHITECTURE.md names methods that do not exist: {wrong}"
    assert not unknown, f"docs/ARCHITECTURE.md names classes that do not exist: {unknown}"
