"""The backend table: a backend is one write-side entry (lower/backends.py) and one load-side
entry (runtime/backends.py); the engine dir's manifest names each program's file."""
import json

import torch

from fastmmoe_compile import FastMMoEConfig, compile_model
from fastmmoe_compile.lower import backends as writers
from fastmmoe_compile.runtime import backends as loaders
from fastmmoe_compile.runtime import load_engine


def test_a_backend_registered_in_a_test_compiles_and_loads(tmp_path, monkeypatch):
    """A new backend touches no package file: torch.export archives under another name."""
    monkeypatch.setattr(writers, "BACKENDS", dict(writers.BACKENDS))
    monkeypatch.setattr(loaders, "LOADERS", dict(loaders.LOADERS))
    written = []

    def write(program, file, role):
        written.append(role)
        torch.export.save(program, str(file))

    writers.register(writers.Backend("archive", ".ep", write, lambda program, role: program.module()))
    loaders.register_loader("archive", lambda file, role, weights: torch.export.load(str(file)).module())
    assert "archive" in writers.backend_names()

    engine = compile_model("tiny-qwen3-moe", FastMMoEConfig(), out=tmp_path / "e", backend="archive", quiet=True)
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["backend"] == "archive" and written == ["backbone", "decode"]
    assert {r: p["file"] for r, p in manifest["programs"].items()} == {"backbone": "backbone.ep",
                                                                      "decode": "decode.ep"}
    assert manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    reference = compile_model("tiny-qwen3-moe", FastMMoEConfig(), backend="export", quiet=True)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    expected = reference.generate(ids, max_new_tokens=3)[0].tolist()
    assert engine.generate(ids, max_new_tokens=3)[0].tolist() == expected
    assert load_engine(tmp_path / "e").generate(ids, max_new_tokens=3)[0].tolist() == expected


def test_backend_names_are_the_tables():
    assert writers.backend_names()[:3] == ("inductor", "export", "onnx")
    assert set(loaders.loader_names()) <= set(writers.backend_names())
