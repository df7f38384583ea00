"""The package boundaries hold: the attention math, the bank, the HTTP client and the small
utilities load without ComfyUI (the client without torch too), and nothing
the product ships (edit_core/, nodes/, the entry point) imports the research tooling.

Each import runs in a fresh interpreter, so a module another test loaded cannot hide one."""
import ast
import json
import subprocess
import sys

import pytest

from helpers import COMFYUI_DIR, REPO

# package -> top-level modules it must not load
FORBIDDEN = {
    "edit_core.attention": ("comfy", "comfy_api", "folder_paths"),
    "edit_core.bank": ("comfy", "comfy_api", "folder_paths"),
    "edit_core.client": ("comfy", "comfy_api", "folder_paths", "torch"),
    "edit_core.util": ("comfy", "comfy_api", "folder_paths"),
}

# Imports the package and each of its modules in turn; after each, the top-level modules
# loaded so far (so the first module that shows a forbidden name is the one that loads it).
LOADED_BY = r"""
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
names = [sys.argv[1]] + [m.name for m in pkgutil.walk_packages(package.__path__, sys.argv[1] + ".")]
loaded = {}
for name in names:
    importlib.import_module(name)
    loaded[name] = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps(loaded))
"""


def modules_loaded_by(package: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOADED_BY, package], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_the_package_loads_without_what_it_must_not_use(package):
    forbidden = set(FORBIDDEN[package])
    loaded = modules_loaded_by(package)
    assert len(loaded) >= 2, f"{package} has no modules to check: {loaded}"
    bad = {name: sorted(forbidden & set(tops)) for name, tops in loaded.items() if forbidden & set(tops)}
    assert not bad, f"importing these loads what the package must not use: {bad}"


def test_the_boundary_check_sees_a_forbidden_import():
    """The control: the ComfyUI seam does load comfy, so the check above can fail."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from edit_core.comfyui.env import setup_comfy; "
            "setup_comfy(sys.argv[1]); import edit_core.comfyui.patcher; print('comfy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(COMFYUI_DIR)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def imported_modules(path) -> set:
    """The absolute top-level names a Python file imports (relative imports stay in the pack)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_nothing_the_product_ships_imports_the_research_tooling():
    product = sorted(REPO.glob("edit_core/**/*.py")) + sorted(REPO.glob("nodes/*.py")) + [REPO / "__init__.py"]
    assert len(product) > 30
    offenders = [str(p.relative_to(REPO)) for p in product if {"research", "tests"} & imported_modules(p)]
    assert not offenders, f"product files that import research/ or tests/: {offenders}"
    # and the product uses relative imports for itself: ComfyUI loads the pack under its folder's name
    absolute = [str(p.relative_to(REPO)) for p in product if "edit_core" in imported_modules(p)]
    assert not absolute, f"product files that import edit_core by its absolute name: {absolute}"
