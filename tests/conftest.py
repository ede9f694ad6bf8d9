import os
from pathlib import Path

import pytest
import torch

from .compile_cache import export_cache, fastmmoe_test_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

# Under pytest-xdist (pyproject's addopts) each worker gets its share of the cores, so that two
# workers on a 2-core machine do not each start two compute threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

TINY = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-olmoe", "tiny-mixtral",
        "tiny-deepseek-v2", "tiny-deepseek-v3", "tiny-glm4-moe"]


# The order in which test files are handed to the xdist workers: longest first. With `--dist
# loadfile` (pyproject) a file runs whole in one worker, and xdist hands files out in queue order
# (`--no-loadscope-reorder`: this order, not xdist's "most tests first"). A long file handed out late
# keeps one worker busy after the other has run out of work (test_readme.py, 2 tests and minutes of
# compiles, used to start near the end), so the longest files start first and the short ones fill in.
# Seconds per file from a quiet 2-worker run of the whole suite (junitxml; 585 tests, 1481 s), except
# those marked "est.": the two files that gained an AOTInductor engine test since (timed alone), and
# the three whose AOTInductor programs are now the README's (test_engine, test_attention_impl,
# test_vlm: built once per session by the compile cache below, by whichever file gets there first;
# their numbers are what is left when test_readme.py has built them, and they are placed after the
# files that start with test_readme.py, so that they find them built instead of waiting on the
# other worker's compile). Files not listed (short ones) run after these. Only the order depends on
# these numbers, never what runs.
FILE_SECONDS = {
    "test_readme.py": 475,  # every README command: two Inductor engines (5 AOTInductor programs)
    "test_onnx.py": 253,
    "test_sparsevlm.py": 240,  # est.: 60 + its AOTInductor engine and generate tests
    "test_engine.py": 200,  # est.: in-process torch.compile; the README's merge engine through the CLI
    "test_authors_compat.py": 170,  # est.: the compat program and its AOTInductor engine
    "test_deepseek_vl2.py": 163,
    "test_decode.py": 146,
    "test_topkv.py": 143,
    "test_merge.py": 143,
    "test_vlm.py": 100,  # est.: the README's VLM engine (3 AOTInductor programs)
    "test_attention_impl.py": 90,  # est.: the README's merge engine from an eager-attention model
    "test_gpu_check.py": 82,
    "test_qwen3_vl_moe.py": 82,
    "test_api_inputs.py": 80,
    "test_serve.py": 66,
    "test_flops.py": 64,
    "test_bf16.py": 61,
    "test_cpu_dtype.py": 60,  # est.: timed alone (-n 0, load ~5): four tiny export-backend engines
    "test_meta.py": 60,
    "test_glm4v_moe.py": 58,
    "test_input_specs.py": 56,
}


def pytest_collection_modifyitems(config, items):
    """Longest files first (FILE_SECONDS), each file's tests in their own order. Every worker
    collects and sorts the same way, so the workers' collections stay equal (xdist checks that)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: within a file, as written


# The session's AOTInductor compile cache (tests/compile_cache/fastmmoe_test_cache.py): a program that
# several tests (or the README's commands, tests/test_readme.py) compile to an AOTInductor package is
# compiled once per session, keyed by a hash of the whole program, weights included. Its directory is
# under this session's temporary root (shared by the xdist workers, with a file lock per program), so
# every run compiles afresh; a hit is a copy of the package the same program compiled to.
COMPILE_CACHE = Path(__file__).resolve().parent / "compile_cache"  # on the README commands' PYTHONPATH
fastmmoe_test_cache.install()  # before the test modules import anything from lower (a pass-through until ENV is set)

# This process's export cache (tests/compile_cache/export_cache.py): a model exported again, unchanged
# (same modules, weights, versions, configs, arguments), gets a copy of the earlier program instead of
# a new trace; the engines built from it are what they were. Off for a test that takes pytest's
# monkeypatch (itself or through a fixture): what it patches could change what a trace makes.
export_cache.install()


@pytest.fixture(scope="session", autouse=True)
def aoti_compile_cache(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: .../pytest-N/popen-gwK
    os.environ[fastmmoe_test_cache.ENV] = str(root / "aoti-compile-cache")
    return root / "aoti-compile-cache"


_ONNX_EXPORTS = [0]  # torch.onnx.export calls in this process (lower/onnx.export_onnx makes one a program)
_BUILDS = pytest.StashKey[tuple]()


def _count_onnx_exports():
    import torch.onnx

    export = torch.onnx.export
    if hasattr(export, "_counted"):
        return

    def onnx_export(*args, **kwargs):
        _ONNX_EXPORTS[0] += 1
        return export(*args, **kwargs)

    onnx_export._counted = True
    torch.onnx.export = onnx_export


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    _count_onnx_exports()
    export_cache.enabled = "monkeypatch" not in item.fixturenames
    item.stash[_BUILDS] = (fastmmoe_test_cache.CALLS, _ONNX_EXPORTS[0])  # before any fixture is set up
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that compiles an AOTInductor package or exports an ONNX program (itself, or through a
    fixture it is the first to use: so every user of such a fixture carries the mark) says so, and why
    it needs that backend: @pytest.mark.aoti("why") / @pytest.mark.onnx("why"). The slow backends are
    spent only where the fact depends on them; numerics alone are checked on the export backend."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not report.passed or _BUILDS not in item.stash:
        return
    aoti, onnx = item.stash[_BUILDS]
    built = {"aoti": fastmmoe_test_cache.CALLS - aoti, "onnx": _ONNX_EXPORTS[0] - onnx}
    missing = [name for name, n in built.items() if n and not getattr(item.get_closest_marker(name), "args", None)]
    if missing:
        report.outcome = "failed"
        report.longrepr = "; ".join(f"{item.nodeid} builds {built[name]} {name} program(s) but has no "
                                    f'@pytest.mark.{name}("why this backend is needed")' for name in missing)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/* from the current output instead of comparing")


@pytest.fixture(scope="session")
def update_golden(request):
    return request.config.getoption("--update-golden")


_MODELS = {}


def tiny_model(name: str):
    """One random tiny model per preset for the whole session (read-only in tests)."""
    from fastmmoe_compile.models import load_model

    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


def hf_last_logits(loaded, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.lm(inputs_embeds=embeds).logits[:, -1]


def prompt(batch: int, seq: int, vision: slice | list, hidden: int, seed: int = 0):
    """Random embeddings and the [B, S] vision mask of the given positions."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, hidden, generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, vision] = True
    return embeds, mask


def save_vlm_checkpoint(preset: str, path):
    """A tiny VLM preset written as a user's local checkpoint: model, tokenizer, processor files."""
    from fastmmoe_compile.models import load_model

    loaded = load_model(preset)
    loaded.vision.model.save_pretrained(path)
    loaded.vision.tokenizer.save_pretrained(path)
    loaded.vision.image_processor.save_pretrained(path)
    return path


def write_images(directory, sizes: dict, seed: int = 0) -> dict:
    """Random RGB PNG files {name: path} of the given (height, width) pixel sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    paths = {}
    for name, (h, w) in sizes.items():
        paths[name] = directory / f"{name}.png"
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(paths[name])
    return paths


def vlm_fixtures(preset: str, image_sizes: dict):
    """Session fixtures (checkpoint, loaded, images, identity_engine) for a tiny VLM preset; a test
    module takes them with `checkpoint, loaded, images, identity_engine = vlm_fixtures(...)`.
    - checkpoint: the preset written as a user's local checkpoint dir (model, tokenizer, processor);
    - loaded: load_model of that dir; images: write_images(image_sizes), a list of PNG paths;
    - identity_engine: Kv = K (so it must be the HF model), built by the CLI from the checkpoint
      with the exported-program backend (fast to build; AOTInductor builds are the slow tests')."""

    @pytest.fixture(scope="session")
    def checkpoint(tmp_path_factory):
        return save_vlm_checkpoint(preset, tmp_path_factory.mktemp("ckpt") / preset)

    @pytest.fixture(scope="session")
    def loaded(checkpoint):
        from fastmmoe_compile.models import load_model

        return load_model(str(checkpoint))

    @pytest.fixture(scope="session")
    def images(tmp_path_factory):
        return list(write_images(tmp_path_factory.mktemp("images"), image_sizes).values())

    @pytest.fixture(scope="session")
    def identity_engine(checkpoint, tmp_path_factory):
        return cli_identity_engine(checkpoint, tmp_path_factory.mktemp("engines") / "identity")

    return checkpoint, loaded, images, identity_engine


def cli_identity_engine(checkpoint, out):
    """Kv = K (the engine must be the HF model), built by the CLI from a checkpoint dir with the
    exported-program backend."""
    from fastmmoe_compile import load_engine
    from fastmmoe_compile.cli import main

    assert main([str(checkpoint), "--out", str(out), "--backend", "export", "--vision-expert-ratio", "1.0",
                 "--quiet"]) == 0
    return load_engine(out)


def processor_without_video(processor_class, loaded, **kwargs):
    """transformers' own processor of a VLM (InternVLProcessor, Qwen3VLProcessor, ...) built from the
    loaded tokenizer and image processor, without the video processor it insists on (that one needs
    torchvision, which the CPU torch here cannot have)."""

    class Processor(processor_class):
        def check_argument_for_proper_class(self, name, arg):
            return None

    tokenizer = loaded.vision.tokenizer
    return Processor(image_processor=loaded.vision.image_processor, tokenizer=tokenizer, video_processor=None,
                     chat_template=tokenizer.chat_template, **kwargs)


def check_common_bad_inputs(engine, image, prompt: str, tmp_path):
    """The errors every VLM engine gives the same way: a missing file, a file that is no image, and
    a placeholder count that does not match the images (both ways)."""
    with pytest.raises(FileNotFoundError, match="image file not found"):
        engine.prepare([tmp_path / "missing.png"], prompt)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        engine.prepare([not_image], prompt)
    with pytest.raises(ValueError, match="0 <image> placeholder"):
        engine.prepare([image], prompt.replace("<image>", ""))
    with pytest.raises(ValueError, match="1 <image> placeholder.* for 0 image"):
        engine.prepare(None, prompt)


# The served engine of tests/test_serve*.py: tiny InternVL with FastMMoE (Top-Kv and token merging,
# so every layer keeps its own cache length), exported-program backend; built once per session.
SERVE_ENGINE_FLAGS = ["--vision-expert-ratio", "0.5", "--merge-layers", "2", "--keep-ratio", "0.5"]


@pytest.fixture(scope="session")
def serve_engine_dir(tmp_path_factory):
    from fastmmoe_compile.cli import main

    out = tmp_path_factory.mktemp("serve") / "tiny-internvl-fastmmoe"
    assert main(["tiny-internvl", "--out", str(out), "--backend", "export", "--quiet", *SERVE_ENGINE_FLAGS]) == 0
    return out


@pytest.fixture(scope="session")
def serve_engine(serve_engine_dir):
    from fastmmoe_compile import load_engine

    return load_engine(serve_engine_dir)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: with a server process on the same cores (tests/test_serve.py),
    two processes spinning two OpenMP threads each on a 2-core box slow each other down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



_FILE_TIME: dict = {}  # {test file: seconds of setup + call + teardown}, summed over the run
_WORKER_TIME: dict = {}  # {xdist worker: seconds of test work}


def pytest_runtest_logreport(report):
    """Every test's phases, as the controller receives them (from each xdist worker): the budget report."""
    file = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
    _FILE_TIME[file] = _FILE_TIME.get(file, 0.0) + report.duration
    worker = getattr(getattr(report, "node", None), "gateway", None)
    worker = worker.id if worker is not None else "main"
    _WORKER_TIME[worker] = _WORKER_TIME.get(worker, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The test-time budget (issue 21): each worker's seconds of test work (wall time is the largest,
    and their sum over the worker count the least it could be) and the 12 costliest files (FILE_SECONDS
    above orders them); then which CPU the run was on, and its bf16 verdict (fastmmoe_compile/runtime/
    cpu.py), at the end of every run (-q included): the bf16 tests' timings and CPU engines' default
    dtype depend on it."""
    from fastmmoe_compile.runtime.cpu import bf16_speed, cpu_model

    if _WORKER_TIME:
        workers = ", ".join(f"{w} {t:.0f} s" for w, t in sorted(_WORKER_TIME.items()))
        terminalreporter.write_line(f"test work per worker: {workers}; in all {sum(_WORKER_TIME.values()):.0f} s")
        files = sorted(_FILE_TIME.items(), key=lambda kv: -kv[1])[:12]
        terminalreporter.write_line("costliest files: " + ", ".join(f"{f} {t:.0f} s" for f, t in files))

    try:
        verdict = bf16_speed().describe()
    except ValueError as e:  # a malformed FASTMMOE_CPU_CAPABILITY
        verdict = str(e)
    terminalreporter.write_line(f"cpu: {cpu_model()}; {verdict}")
