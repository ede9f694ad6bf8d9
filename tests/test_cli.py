"""The command line: presets, diff, errors as one line with exit code 2, the engine directory
(overwrite only an engine, no partial dir left behind, file modes)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastmmoe_compile.cli import main


def test_presets_lists_every_family(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-glm4-moe", "internvl3.5-30b-a3b-backbone"):
        assert name in out


def test_diff_prints_the_rewrite(capsys):
    assert main(["diff", "tiny-qwen3-moe", "--reduce-from-layer", "3", "--vision-topk", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer 3:\n")
    assert "+ 1 x fastmmoe.route_pairs_topkv" in out and "[B, N], 1)" in out


TINY = ["tiny-qwen3-moe", "--out", "x"]
MERGE = TINY + ["--merge-layers", "1,2", "--keep-ratio", "0.5"]

# Bad input of every kind: exit code 2, one line naming the flags the user typed, nothing on disk.
# Compile cases fail before loading where they can (the ones that need the model load a tiny one).
BAD_INPUT = [
    # flags that would be silently ignored
    (TINY + ["--keep-ratio", "0.25"], "--keep-ratio needs --merge-layers or --preset"),
    (["flops", "internvl3.5-30b-a3b-backbone", "--keep-ratio", "0.25"],
     "--keep-ratio needs --merge-layers or --preset"),
    (["diff", "tiny-qwen3-moe", "--window", "4"], "--window needs --merge-layers or --preset"),
    (TINY + ["--stage-ratios", "0.9"], "--stage-ratios needs --merge-layers or --preset"),
    (TINY + ["--merge-layers", "1,2"], "--merge-layers has no effect while every stage keeps all vision tokens"),
    (MERGE + ["--stage-ratios", "0.7,0.7"], "--keep-ratio and --stage-ratios both set the stages' ratios"),
    (TINY + ["--vision-topk", "2", "--vision-expert-ratio", "0.25"],
     "--vision-expert-ratio and --vision-topk both set Kv"),
    (TINY + ["--vision-expert-ratio", "1", "--reduce-from-layer", "1"],
     "--reduce-from-layer has no effect with --vision-expert-ratio 1"),
    (MERGE + ["--strategy", "routing", "--alpha", "0.3"], "--alpha weighs the scores of --strategy hybrid only"),
    (MERGE + ["--merge-ratio", "0", "--merge-method", "mean"], "--merge-method has no effect with --merge-ratio 0"),
    (TINY + ["--method", "fastv", "--window", "3"],
     "--method fastv takes --fastv-layer and --keep-ratio only, not --window"),
    (TINY + ["--method", "fastv", "--preset", "internvl3.5-30b-a3b"], "only, not --preset"),
    (["flops", "tiny-qwen3-moe", "--fastv-layer", "3"], "--fastv-layer needs --method fastv"),
    (["diff", "tiny-deepseek-v2", "--merge-layers", "0", "--keep-ratio", "0.5"],
     "merge layer 0 has no routed-MoE router (a dense layer?)"),
    (["bench", "--no-decode", "--decode-steps", "3"], "--decode-steps and --no-decode"),
    (["bench", "--variants", "topkv", "--fastv-layer", "3"], "--fastv-layer needs fastv variants"),
    (["bench", "--variants", "fastv", "--config-preset", "deepseek-vl2-small"],
     "--config-preset needs fastmmoe variants"),
    (["bench", "--profile-rows", "5", "--no-profile"], "--profile-rows needs the CPU profile"),
    # values out of range, named as flags
    (TINY + ["--vision-expert-ratio", "0"], "--vision-expert-ratio must be in (0, 1]"),
    (TINY + ["--reduce-from-layer", "9"], "--reduce-from-layer 9 is out of range: the model has 4 decoder layers"),
    (TINY + ["--merge-layers", "5,2", "--keep-ratio", "0.5"], "--merge-layers must be strictly increasing"),
    (TINY + ["--vision-topk", "6"], "--vision-topk 6 exceeds the model's top-k (4)"),
    (["flops", "tiny-qwen3-moe", "--method", "fastv", "--fastv-layer", "-1"], "--fastv-layer must be >= 0"),
    (["flops", "tiny-qwen3-moe", "--vision-tokens", "-1"], "--vision-tokens >= 0"),
    (["bench", "--vision", "-1"], "--vision must be >= 1, got -1"),
    (["bench", "--prefix", "65"], "--prefix 65 must be at most --text 64"),
    (["bench", "--keep-ratios", "0.5,x"], "--keep-ratios must be comma-separated numbers in (0, 1]"),
    # what MODEL names
    (["/no/such/checkpoint", "--out", "x"], "no checkpoint directory"),
    (["tiny-qwen3-mo", "--out", "x"],
     "unknown preset 'tiny-qwen3-mo'; did you mean tiny-qwen3-moe? (fastmmoe-compile presets"),
    (["diff", "tiny-qwen3-mo"], "did you mean tiny-qwen3-moe?"),
    (["noweights", "--out", "x"], "noweights has a config.json but no weights"),
    (["userdir", "--out", "x"], "userdir is not a checkpoint directory: it has no config.json"),
    # argparse's own complaints: one line too, the usage only on -h
    (["tiny-qwen3-moe", "--keep-ratio", "abc", "--out", "x"], "argument --keep-ratio: invalid float value: 'abc'"),
    (["tiny-qwen3-moe"], "the following arguments are required: --out (fastmmoe-compile compile -h"),
    (["flops", "tiny-qwen3-moe", "--no-such-flag"], "unrecognized arguments: --no-such-flag (fastmmoe-compile flops -h"),
    (["serve", "e", "--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
    # run checks its inputs before it loads the engine (which takes seconds to minutes)
    (["run", "noengine", "--image", "missing.png", "--prompt", "<image> what?"], "image file not found: missing.png"),
    (["run", "noengine", "--image", "userfile.txt", "--prompt", "<image> what?"], "userfile.txt is not an image file"),
    (["run", "noengine", "--image", "missing.png", "--prompt", "what?"],
     "--prompt has 0 <image> placeholder(s) for 1 --image(s)"),
    (["run", "userdir", "--prompt", "what?"], "userdir has no manifest.json"),
    # where --out points; the hint names only what works (--overwrite replaces engines only)
    (TINY[:1] + ["--out", "userdir"], "userdir exists and is not a fastmmoe engine (no fastmmoe-engine "
                                      "manifest.json): remove it yourself or write elsewhere"),
    (TINY[:1] + ["--out", "userdir", "--overwrite"], "userdir exists and is not a fastmmoe engine"),
    (TINY[:1] + ["--out", "userfile.txt", "--overwrite"], "userfile.txt exists and is not a fastmmoe engine"),
    (TINY[:1] + ["--out", "/proc/fastmmoe-engine"], "cannot write the engine /proc/fastmmoe-engine"),
]


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "notes.txt").write_text("the user's file")
    (tmp_path / "userfile.txt").write_text("the user's file")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("[fastmmoe]")]  # progress lines
    assert errors == [errors[0]] and errors[0].startswith("fastmmoe-compile: error: "), err
    assert message in err and "Traceback" not in err and "usage:" not in err
    assert "--overwrite" not in err or "already exists" in err  # never suggested where it would be refused
    assert _tree(tmp_path) == before  # nothing written, nothing removed
    assert not os.path.exists("/proc/fastmmoe-engine")


def test_unsupported_family_lists_supported(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    assert main([str(tmp_path / "llama"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "'llama' is not a supported routed-MoE family" in err and "qwen3_moe" in err


def test_inspect_refuses_a_plain_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a fastmmoe engine" in capsys.readouterr().err


def test_flops_json_on_a_real_size_shape(capsys):
    import json

    assert main(["flops", "internvl3.5-30b-a3b-backbone", "--preset", "internvl3.5-30b-a3b", "--keep-ratio", "0.5",
                 "--vision-tokens", "1024", "--text-tokens", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["baseline_flops"] > d["fastmmoe_flops"] > 0
    assert d["reduction"] == pytest.approx(1 - d["fastmmoe_flops"] / d["baseline_flops"])
    assert 0.3 < d["reduction"] < 0.8


def test_flops_table_for_a_tiny_preset(capsys):
    assert main(["flops", "tiny-qwen3-moe", "--vision-tokens", "24", "--text-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("workload: 16 text + 24 vision tokens") and "fewer FLOPs" in out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert rows[-2].startswith("| lm_head |") and rows[-1].startswith("| **total** |")
    assert {line.count("|") for line in rows} == {rows[0].count("|")}  # every row has the header's columns


def test_stage_ratios_help_shows_ratios(capsys):
    with pytest.raises(SystemExit):
        main(["diff", "-h"])
    help_text = " ".join(capsys.readouterr().out.split())
    stage = help_text.rsplit("--stage-ratios STAGE_RATIOS", 1)[1]  # the option list, after the usage.split(" --", 1)[0]
    assert "e.g. 0.91,0.91,0.91" in stage and "5,8,12" not in stage


COMPILE = ["tiny-qwen3-moe", "--backend", "export", "--no-decode", "--quiet", "--out"]


def test_engine_dir_overwrite_modes_and_abandoned_partials(tmp_path, capsys):
    from fastmmoe_compile.runtime.manifest import OWNER, _owner

    # Partial engine dirs beside --out: only one whose writer provably died (or whose pid now
    # belongs to another process) goes; a running writer's and one without a marker stay.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owners = {".a.dead.partial": {"pid": gone.pid}, ".b.reused.partial": {"pid": os.getpid(), "started": "1"},
              ".c.live.partial": {"pid": os.getpid()}, ".d.unmarked.partial": None}
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        if owner is not None:
            (tmp_path / name / OWNER).write_text(json.dumps({**_owner(), **owner}))
    umask = os.umask(0)
    os.umask(umask)
    assert main(COMPILE + [str(tmp_path / "e")]) == 0
    assert sorted(p.name for p in tmp_path.glob(".*.partial")) == [".c.live.partial", ".d.unmarked.partial"]
    files = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert files == ["backbone.pt2", "graph_diff.txt", "manifest.json", "weights.safetensors"]  # no marker
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "e").iterdir()} == \
        {name: oct(0o666 & ~umask) for name in files}
    assert (tmp_path / "e").stat().st_mode & 0o777 == 0o777 & ~umask
    (tmp_path / "e" / "graph_diff.txt").write_text("old")
    assert main(COMPILE + [str(tmp_path / "e"), "--overwrite"]) == 0  # an engine is replaced
    assert (tmp_path / "e" / "graph_diff.txt").read_text() != "old"


def test_api_overwrites_only_an_engine(tmp_path):
    from fastmmoe_compile import compile_model

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a fastmmoe engine"):
        compile_model("tiny-qwen3-moe", out=tmp_path / "mine", overwrite=True, backend="export")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_sigterm_leaves_no_partial_engine_dir(tmp_path):
    # The compile holds its partial dir open (a sleep after the backbone is written) until the SIGTERM.
    code = ("import time, fastmmoe_compile.api as api\n"
            "write = api._write_program\n"
            "api._write_program = lambda *a: (write(*a), time.sleep(600))\n"
            "from fastmmoe_compile.cli import main\n"
            f"raise SystemExit(main({COMPILE + ['e']!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not any((p / "backbone.pt2").is_file() for p in tmp_path.glob(".e.*.partial")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == "fastmmoe-compile: terminated", err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_subcommands(capsys):
    from fastmmoe_compile.cli import SUBCOMMANDS

    with pytest.raises(SystemExit) as info:
        main(["-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in SUBCOMMANDS), out


def test_compile_is_the_implied_command(capsys):
    # `MODEL --out DIR` and `compile MODEL --out DIR` are one command (a mistyped preset fails before loading).
    for argv in (["tiny-qwen3-mo", "--out", "x"], ["compile", "tiny-qwen3-mo", "--out", "x"]):
        assert main(argv) == 2
        assert "did you mean tiny-qwen3-moe?" in capsys.readouterr().err


def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    # A ValueError / NotImplementedError from inside the compiler is a traceback, not exit code 2.
    import fastmmoe_compile.api as api

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(api, "rewrite", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["diff", "tiny-qwen3-moe"])


def test_bad_input_is_told_by_its_class():
    # The CLI's exit 2 rests on the error's class alone (errors.py), whatever function raised it;
    # the classes stay what callers caught before (ValueError, NotImplementedError, RuntimeError).
    from fastmmoe_compile import errors
    from fastmmoe_compile.lower.backends import BackendUnavailableError
    from fastmmoe_compile.passes.token_reduction import MergeLayerError, TokenReductionError
    from fastmmoe_compile.runtime import EngineFormatError
    from fastmmoe_compile.runtime.generate import DecodeUnavailableError

    assert issubclass(errors.UnsupportedModelError, (errors.UserInputError, NotImplementedError))
    assert issubclass(MergeLayerError, errors.ConfigError) and issubclass(MergeLayerError, TokenReductionError)
    for cls in (errors.ConfigError, errors.UnknownModelError, errors.ShapeOnlyModelError, BackendUnavailableError,
                EngineFormatError, DecodeUnavailableError):
        assert issubclass(cls, errors.UserInputError) and issubclass(cls, ValueError), cls
    assert issubclass(EngineFormatError, RuntimeError) and issubclass(DecodeUnavailableError, RuntimeError)
    import fastmmoe_compile.cli as cli

    assert not any(hasattr(cli, name) for name in ("_INPUT_ERROR_SITES", "_is_user_error"))


# --- diff and flops need a model's shapes, not its weights (issue 22) ----------------------------

def _config_only(preset: str, directory):
    """A directory holding only the preset's config.json, as a published model's config alone."""
    from fastmmoe_compile.models.presets import PRESETS

    directory.mkdir()
    config = PRESETS[preset].make_config()
    if hasattr(config, "raw"):  # DeepSeek-VL2: the official layout, which transformers does not know
        (directory / "config.json").write_text(json.dumps(config.raw))
    else:
        config.save_pretrained(directory)
    assert os.listdir(directory) == ["config.json"]
    return directory


def _tiny_presets():
    from fastmmoe_compile.models.presets import PRESETS

    return [p.name for p in PRESETS.values() if p.kind == "tiny random"]


@pytest.mark.parametrize("preset", _tiny_presets())
def test_flops_of_a_config_json_alone_equal_the_models(preset, tmp_path, capsys):
    # Every supported family (the tiny presets cover them all, DeepSeek-VL2's three layouts included).
    directory = _config_only(preset, tmp_path / preset)
    flags = ["--json", "--vision-topk", "1"]
    assert main(["flops", str(directory), *flags]) == 0
    from_config = json.loads(capsys.readouterr().out)
    assert main(["flops", preset, *flags]) == 0
    from_preset = json.loads(capsys.readouterr().out)
    for key in ("baseline_flops", "fastmmoe_flops", "baseline_by_part", "fastmmoe_by_part"):
        assert from_config[key] == from_preset[key], key


def test_diff_of_a_deepseek_vl2_config_json_alone(tmp_path, capsys):
    directory = _config_only("tiny-deepseek-vl2-base", tmp_path / "flagship")
    assert main(["diff", str(directory), "--vision-topk", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layers 2-3:\n") and "+ 1 x fastmmoe.route_pairs_topkv" in out
    assert "fastmmoe.grouped_mm([-2*B*N + 3*B*S, 64], [9, 64, 64], [9])" in out  # 9 experts top-3, Kv 1
    # compile needs the weights: the config alone is still refused, before any work
    assert main([str(directory), "--out", str(tmp_path / "engine")]) == 2
    assert "has a config.json but no weights" in capsys.readouterr().err
    assert not (tmp_path / "engine").exists()


def test_torchs_leafspec_deprecation_is_not_shown_and_other_warnings_are(monkeypatch):
    # torch's export/AOTInductor code trips its own FutureWarning (four lines per compile); the CLI
    # hides that one warning, nothing else.
    import warnings

    import fastmmoe_compile.cli as cli
    from torch.utils import _pytree

    def noisy(args):
        _pytree.LeafSpec()  # what torch's own code does during a compile
        warnings.warn("a FutureWarning of someone else's", FutureWarning)
        return 0

    monkeypatch.setitem(cli._COMMANDS, "presets", noisy)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert main(["presets"]) == 0
        _pytree.LeafSpec()  # outside the CLI it is torch's business, as before
    messages = [str(w.message) for w in shown]
    assert messages[0] == "a FutureWarning of someone else's" and "LeafSpec" in messages[1] and len(messages) == 2, messages
