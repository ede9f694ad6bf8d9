"""Adapters that let other tools run fastmmoe-compile engines.

lmms_eval: `lmms-eval --model fastmmoe --model_args engine=DIR ...`. lmms-eval finds the model
through this package's `lmms_eval.models` entry point (pyproject.toml), which calls
`lmms_eval_manifest` below; the adapter module itself imports lmms-eval only when loaded.
"""

MODEL_ID = "fastmmoe"


def lmms_eval_manifest():
    """lmms-eval's registration payload (its ModelRegistryV2 reads entry points of this group)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="fastmmoe_compile.integrations.lmms_eval.FastMMoE")
