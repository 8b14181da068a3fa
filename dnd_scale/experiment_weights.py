"""Where the generated adapters lie in weight space: relative distances to the training LoRAs' mean,
to the oracle and to each training LoRA, over the raw A and B matrices and over the updates
ΔW = B A they apply (through a Gram matrix, without forming ΔW)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from dnd_scale.export import ADAPTER_WEIGHTS
from dnd_scale.io import load_safetensors


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[key].float().flatten() for key in sorted(state)])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / ADAPTER_WEIGHTS if path.is_dir() else path, "adapter")


def update_gram(states: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(n, n) Frobenius inner products <ΔW_i, ΔW_j> summed over modules, ΔW = B A of each LoRA module,
    without forming ΔW: <B1 A1, B2 A2> = sum((B1ᵀ B2) * (A1 A2ᵀ)), products of r x r matrices."""
    n = len(states)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key_a in (k for k in sorted(states[0]) if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        a = torch.stack([s[key_a].double() for s in states])  # (n, r, in)
        b = torch.stack([s[key_b].double() for s in states])  # (n, out, r)
        bb = torch.einsum("ior,jos->ijrs", b, b)  # B_iᵀ B_j
        aa = torch.einsum("irx,jsx->ijrs", a, a)  # A_i A_jᵀ
        gram += (bb * aa).sum(dim=(2, 3))
    return gram


def _distances(k: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, Any]:
    """From the Gram matrix `k` of some vectors: the relative distance ||g - x|| / ||x|| of each
    generated one to the mean of the training ones and to the oracle, the oracle's to that mean, and
    each generated one's norm ratio and cosine to the oracle (`groups` holds their indices in `k`)."""
    gen, train, ora = groups["generated"], groups["training"], groups["oracle"][0]

    def sq(u: dict[int, float], v: dict[int, float]) -> float:  # <u, v> for u, v combinations of items
        return float(sum(cu * cv * k[i, j] for i, cu in u.items() for j, cv in v.items()))

    def rel(u: dict[int, float], x: dict[int, float]) -> float:
        diff = dict(u)
        for i, c in x.items():
            diff[i] = diff.get(i, 0.0) - c
        return max(sq(diff, diff), 0.0) ** 0.5 / sq(x, x) ** 0.5

    mean = {i: 1.0 / len(train) for i in train}
    return {
        "to_training_mean": [rel({g: 1.0}, mean) for g in gen],
        "to_oracle": [rel({g: 1.0}, {ora: 1.0}) for g in gen],
        "oracle_to_training_mean": rel({ora: 1.0}, mean),
        "norm_ratio_to_oracle": [(float(k[g, g]) / float(k[ora, ora])) ** 0.5 for g in gen],
        "cosine_to_oracle": [float(k[g, ora] / (k[g, g] * k[ora, ora]).sqrt()) for g in gen],
    }


def weight_distances(generated: Sequence[Path], training: dict[str, Path], oracle: Path) -> dict[str, Any]:
    """Relative L2 distances ||g - x|| / ||x|| of each generated adapter to the training mean, the
    oracle and each training LoRA, and the spread of the generated adapters among themselves: over
    the raw A and B matrices (dominated by A's shared initialization, which training moves little)
    and, under "update", over the updates ΔW = B A the adapters apply to the base."""
    states = [_state(p) for p in [*generated, *training.values(), oracle]]  # each file read once
    g, t = len(generated), len(training)
    gen = torch.stack([_flat(s) for s in states[:g]])  # (G, P)
    train = {name: _flat(s) for name, s in zip(training, states[g:g + t])}
    mean = torch.stack(list(train.values())).mean(dim=0)
    ora = _flat(states[-1])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    gram = update_gram(states)
    groups = {"generated": list(range(g)), "training": list(range(g, g + t)), "oracle": [g + t]}
    update = _distances(gram, groups)
    update["to_training"] = {name: [_distances(gram, {**groups, "training": [g + i]})["to_training_mean"][j]
                                    for j in range(g)] for i, name in enumerate(training)}
    return {
        "to_training_mean": [rel(x, mean) for x in gen],
        "to_oracle": [rel(x, ora) for x in gen],
        "to_training": {name: [rel(x, tr) for x in gen] for name, tr in train.items()},
        "between_generated": float(torch.pdist(gen).mean() / gen.norm(dim=1).mean()) if len(gen) > 1 else None,
        "oracle_to_training_mean": rel(ora, mean),
        "oracle_to_training": {name: rel(ora, tr) for name, tr in train.items()},
        "update": update,
    }
