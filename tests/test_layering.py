"""The import layering of pyproject.toml's [tool.importlinter] holds: cli -> bench -> api ->
passes/lower -> export -> models -> runtime -> config/ops/algorithm, and the runtime's own
modules import each other without cycles."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lint_imports_keeps_every_contract():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: pip install 'fastmmoe-compile[test]' (import-linter)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_loading_an_engine_imports_no_compiler_layer():
    """The runtime stands alone: importing it (and its front ends) loads no models/export/passes/lower."""
    code = ("import sys, fastmmoe_compile.runtime, fastmmoe_compile.runtime.frontends, "
            "fastmmoe_compile.runtime.multimodal, fastmmoe_compile.runtime.generate\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
            "[['fastmmoe_compile', x] for x in ('models', 'export', 'passes', 'lower', 'api')])\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=300)


def test_every_vlm_family_has_its_front_end():
    """An engine of each compilable VLM family loads: its adapter is its runtime front end, extended."""
    from fastmmoe_compile.models.registry import VLM_FAMILIES
    from fastmmoe_compile.runtime.frontends import FRONT_ENDS

    assert list(FRONT_ENDS) == list(VLM_FAMILIES)
    for name, family in VLM_FAMILIES.items():
        assert isinstance(family, type(FRONT_ENDS[name])), name
