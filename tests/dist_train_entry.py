"""Launched by tests/test_distributed.py (directly, or on every rank by the `deepspeed` launcher).

Runs `dnd_scale.trainer.train` once per entry of --runs, in one process, so one launch pays the
torch/DeepSpeed start-up once for several trainings. Each entry is a JSON object of train-section
overrides plus "stream": "loader" (the production shard loader, the default), "global" (see
`GlobalOrderStream`) or "loader_of_2_ranks" (see `RanksReplayStream`).

    python tests/dist_train_entry.py --run RUN --config RECIPE --runs '[{"output_dir": "z2", "zero_stage": 2}]'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping

from dnd_scale.config import from_dict, to_dict
from dnd_scale.loader import collate_pairs, gather_prompts
from dnd_scale.shards import iter_blocks
from dnd_scale.train_config import TrainConfig, load_train_config
from dnd_scale.train_data import TrainingData, pair_stream
from dnd_scale.trainer import train


class GlobalOrderStream:
    """Micro-batches cut from ONE global order of the shard set's pairs, whatever the world size.

    Step s's global batch is pairs [s·G, (s+1)·G), G = micro × accumulation × world; rank r's k-th
    micro-batch of the step is its slice (k·world + r). A 1-rank run with the same G therefore sees
    exactly the samples of a 2-rank run at every step, which the production loader (shards split
    by rank, seeds per rank) deliberately does not provide; the equivalence test needs it.
    """

    def __init__(self, data: TrainingData, config: TrainConfig, rank: int, world_size: int) -> None:
        self.data = data
        names = data.shard_index["encoding"]["task_names"]
        self.pairs = [
            (names[task], checkpoint, ids)
            for _, block in iter_blocks(data.shards_dir, data.shard_index)
            for task, checkpoint, ids in zip(block.task.tolist(), block.checkpoint.tolist(), block.prompt_ids.tolist())
        ]  # in written order
        self.micro, self.accum = config.micro_batch_size, config.grad_accum_steps
        self.rank, self.world = rank, world_size
        self.position = 0  # micro-batches this rank has taken

    def __next__(self) -> dict:
        step, k = divmod(self.position, self.accum)
        start = step * self.micro * self.accum * self.world + (k * self.world + self.rank) * self.micro
        rows = [self.pairs[(start + j) % len(self.pairs)] for j in range(self.micro)]
        self.position += 1
        batch = collate_pairs(rows, self.data.targets)
        batch["prompts"] = gather_prompts(batch["task"], batch["prompt_ids"], self.data.pools)
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.position = int(state["position"])


class RanksReplayStream:
    """In one process, the production loader streams of every rank of a `ranks`-rank world, in turn.

    Micro-batch i comes from rank (i mod ranks)'s own `pair_stream` (its share of the shards, its
    seeds). A 1-rank run with accumulation A × ranks therefore averages, at every step, exactly the
    micro-batches a `ranks`-rank launch with accumulation A trains on: the reference for a real
    multi-rank launch that reads through the production loader.
    """

    def __init__(self, data: TrainingData, config: TrainConfig, rank: int, world_size: int, ranks: int) -> None:
        if world_size != 1:
            raise ValueError(f"a replay of {ranks} ranks runs in a world of one, not {world_size}")
        self.streams = [pair_stream(data, config, r, ranks) for r in range(ranks)]
        self.position = 0

    def __next__(self) -> dict:
        batch = next(self.streams[self.position % len(self.streams)])
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: Mapping) -> None:
        self.position = int(state["position"])
        for stream, saved in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(saved)


STREAMS = {
    "loader": pair_stream,
    "global": GlobalOrderStream,
    "loader_of_2_ranks": lambda data, config, rank, world: RanksReplayStream(data, config, rank, world, ranks=2),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of train-section overrides, one training each")
    args = parser.parse_args(argv)
    base = to_dict(load_train_config(args.config, []))
    for entry in json.loads(args.runs):
        entry = dict(entry)
        stream = STREAMS[entry.pop("stream", "loader")]
        config = from_dict(TrainConfig, {**base, **entry}, "train.")
        train(config, Path(args.run), make_stream=stream)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
