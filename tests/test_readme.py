"""The README runs as written: its "Use" commands in order, then every Python block in order in
one namespace, in a fresh directory holding only the two inputs the README says are the user's
(a checkpoint directory and images). Blocks that are not run are listed here, with why."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import COMPILE_CACHE, write_images

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("readme_blocks", ROOT / "scripts" / "readme_blocks.py")
readme_blocks = sys.modules["readme_blocks"] = importlib.util.module_from_spec(_spec)  # dataclasses need it there
_spec.loader.exec_module(readme_blocks)

# Blocks this test does not run, by section: each one's reason.
NOT_RUN = {
    readme_blocks.SETUP_SECTION: "the set-up itself: .ci/run runs it in a fresh environment",
    "GPU check": "a download here and a command for a GPU machine: .ci/run runs it as written, with --dry-run, "
                 "under torch 2.11 and 2.14",
    "Evaluation with lmms-eval": "an install line and lmms-eval's own CLI, which downloads its datasets (no network)",
    "Serve (OpenAI-compatible server)": "starts a long-running server and talks to it; tests/test_serve.py runs a "
                                        "server process and drives it with the openai client",
}

pytestmark = pytest.mark.slow


def _blocks():
    return readme_blocks.blocks()


def test_every_block_is_run_or_listed_as_not_run():
    for b in _blocks():
        if b.language in ("bash", "python"):
            assert b.section == "Use" or b.language == "python" or b.section in NOT_RUN, \
                f"README.md:{b.line} ({b.section}) is neither run by this test nor listed in NOT_RUN"
        else:  # output samples and diagrams have no language; none of them may look like a command
            assert not b.text.lstrip().startswith(("fastmmoe-compile", "pip ", "python")), f"README.md:{b.line}"


@pytest.mark.aoti("the README's commands build two engines with the default backend (in subprocesses, so the "
                  "check of conftest.py does not see them)")
def test_readme_runs_as_written(tmp_path, monkeypatch):
    import torch

    from fastmmoe_compile.models import load_model

    # The user's two inputs: a checkpoint directory and images.
    load_model("tiny-qwen3-moe").lm.save_pretrained(tmp_path / "my-checkpoint")
    write_images(tmp_path, {"cat": (64, 80), "a": (120, 90), "b": (50, 50)})  # cat.png, a.png, b.png
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The commands share the session's AOTInductor compile cache (conftest.COMPILE_CACHE: a program the
    # rest of the suite also compiles, e.g. tests/test_vlm.py's engine of tiny-internvl, is compiled once).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COMPILE_CACHE), os.environ.get("PYTHONPATH")]))

    shell = [b for b in _blocks() if b.section == "Use" and b.language == "bash"]
    assert len(shell) == 1
    for command in shell[0].commands():
        start = time.time()
        # timeout: a hang guard, generous because a compile may first wait for another worker that is
        # compiling the same program (the cache's lock) on a busy machine.
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=2400)
        assert done.returncode == 0, f"README.md:{shell[0].line}: {command}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        print(f"{time.time() - start:6.1f} s  {command}")  # shown with -rP: where the file's minutes go

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    python = [b for b in _blocks() if b.language == "python" and b.section not in NOT_RUN]
    assert len(python) >= 3
    for b in python:
        exec(compile(b.text, f"README.md:{b.line}", "exec"), namespace)  # noqa: S102 - the README's own code
    # What the blocks leave behind is what they say they compute.
    assert namespace["result"].logits.shape[0] == 1  # the last block's VLM prefill: one prompt
    assert isinstance(namespace["answers"], list) and len(namespace["answers"]) == 2
    assert namespace["logits"].shape == (2, 256)  # [B, vocab] of tiny-qwen3-moe
    assert torch.isfinite(namespace["logits"]).all()
    assert (tmp_path / "engine_dir" / "manifest.json").is_file()
