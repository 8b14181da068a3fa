"""`CollectConfig`: how `dnd collect` trains a LoRA per task and which checkpoints of its trajectory it keeps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dnd_scale.layout import LoraSpec


@dataclass
class CollectConfig:
    """How to collect LoRA checkpoints for every task."""

    base_model: str = ""
    """Base model: a Hugging Face model folder, a .gguf file, or a model config.json (random-init model)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The LoRA to train (rank, alpha, target modules, layers); it fixes the checkpoint layout."""
    steps: int = 200
    """Optimizer steps per task."""
    lr: float = 1e-4
    """AdamW learning rate, constant over the run."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 turns clipping off."""
    batch_size: int = 8
    """Records per optimizer step (sampled without replacement within each pass over the task)."""
    max_length: int = 512
    """Tokens per example after the chat template; longer examples are cut at the end."""
    save_every: int = 1
    """Save a checkpoint every this many steps within the trajectory window."""
    save_last: int = 50
    """Trajectory window: checkpoints are taken over the last this many steps (the final step always)."""
    seed: int = 0
    """Seed of the LoRA initialization (the same for every task), of data order and dropout (per task,
    derived from seed and task name) and of a random-init base model."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ... Under a launcher with several
    ranks, "auto" and "cuda" mean each rank's own GPU (cuda:LOCAL_RANK, or cuda:0 when each rank sees only
    its own); an explicit index is taken as is."""
    dtype: str = "auto"
    """Base model dtype: "auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16",
    "float16". LoRA parameters and checkpoints are float32 in every case."""
    resume_every: int = 50
    """Save the resume state of a task (LoRA, optimizer, RNG, step) every this many steps, besides at each
    checkpoint, so that a killed task loses at most this many steps. It does not change the checkpoints."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.save_last <= self.steps:
            problems.append(f"save_last must be between 1 and steps={self.steps}, got {self.save_last}")
        if self.save_every < 1:
            problems.append(f"save_every must be >= 1, got {self.save_every}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.resume_every < 1:
            problems.append(f"resume_every must be >= 1, got {self.resume_every}")
        if problems:
            raise ValueError("invalid collect config: " + "; ".join(problems))

    def checkpoint_steps(self) -> list[int]:
        """The steps that get a checkpoint: every `save_every` steps back from the last, within `save_last`."""
        first = self.steps - self.save_last + 1
        return [step for step in range(first, self.steps + 1) if (self.steps - step) % self.save_every == 0]

    def checkpoint_fields(self) -> dict[str, Any]:
        """The fields that shape the checkpoints (the device and resume_every do not), as plain JSON:
        what `store.COLLECT_META` records and a task's resume state is checked against."""
        fields = asdict(self)
        fields.pop("device")
        fields.pop("resume_every")
        return json.loads(json.dumps(fields))
