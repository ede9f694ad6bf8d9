"""Export: torch.export of the language backbone with the MoE dispatch we own."""
from .capture import INPUT_NAMES, Backbone, example_inputs, export_backbone

__all__ = ["INPUT_NAMES", "Backbone", "example_inputs", "export_backbone"]
