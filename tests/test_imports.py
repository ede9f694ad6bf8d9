"""Every module imports, and every third-party import is declared in pyproject.toml.

A package installed by hand on a developer's or CI's machine can hide an undeclared dependency
(Pillow did, once); these tests fail on such an import in CI, not on a user's machine.
"""
import ast
import importlib
import importlib.metadata as md
import pkgutil
import re
import sys
import tomllib
from pathlib import Path

import pytest

import fastmmoe_compile

ROOT = Path(__file__).resolve().parent.parent

# Integrations whose third-party package cannot be declared: lmms-eval's own dependencies pull
# torchvision and a CUDA torch, so it is installed --no-deps (README: "Evaluation with lmms-eval").
OPTIONAL = {"lmms_eval": "fastmmoe_compile.integrations.lmms_eval"}

# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow", "onnx_ir": "onnx-ir", "yaml": "pyyaml"}

# Modules of this repository that are imported by file name (tests and benchmarks import each other).
LOCAL = {"fastmmoe_compile", "tests", "benchmarks", "conftest", "reference", "bench_topkv", "bench_onnx",
         "readme_blocks"}


def package_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(fastmmoe_compile.__path__, "fastmmoe_compile."))


@pytest.mark.parametrize("name", package_modules())
def test_every_module_imports(name):
    optional = {module: package for package, module in OPTIONAL.items()}
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if optional.get(name) != top:
            raise
        pytest.skip(f"{name} needs the optional {top} (README: install it --no-deps)")


def _third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL and n != "__future__"}


def _declared() -> set[str]:
    """Distribution names in [project] dependencies and every optional-dependency group."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        requirements += group
    return {_normal(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_declared():
    declared = _declared()
    undeclared = {}
    for folder in ("fastmmoe_compile", "tests", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _third_party_imports(path):
                if name in OPTIONAL:
                    continue
                if _normal(DISTRIBUTION.get(name, name)) not in declared:
                    undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_optional_integrations_import_only_their_package():
    """The optional packages are imported only by their integration module (and its tests)."""
    for package, module in OPTIONAL.items():
        owner = ROOT / (module.replace(".", "/") + ".py")
        for path in (ROOT / "fastmmoe_compile").rglob("*.py"):
            if path != owner and path.name != "__init__.py":
                assert package not in _third_party_imports(path), f"{path} imports the optional {package}"


def test_the_installed_transformers_is_within_the_pin():
    """The pin's upper bound keeps pip from resolving an untested transformers."""
    from packaging.specifiers import SpecifierSet

    from fastmmoe_compile.transformers_compat import TESTED_TRANSFORMERS

    spec = next(r for r in md.requires("fastmmoe-compile") if r.startswith("transformers"))
    allowed = SpecifierSet(spec[len("transformers"):].split(";")[0].strip())
    assert md.version("transformers") in allowed
    newest_minor = max(tuple(int(x) for x in v.split(".")[:2]) for v in TESTED_TRANSFORMERS)
    upper = f"{newest_minor[0]}.{newest_minor[1] + 1}"
    assert f"<{upper}" in str(allowed), f"the pin {allowed} should stop at {upper}: tested {TESTED_TRANSFORMERS}"
