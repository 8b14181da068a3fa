"""dnd_scale: train Drag-and-Drop parameter generators that turn prompts into LoRA adapters."""

__version__ = "0.1.0"
