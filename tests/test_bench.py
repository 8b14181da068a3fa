"""`dnd bench data` at a small size: every number it reports is measured and consistent."""

import json

from dnd_scale.bench_data import bench_data, report
from dnd_scale.cli import main


def test_bench_data_measures_write_and_read(tmp_path):
    result = bench_data(tmp_path / "run", pairs=3000, workers=2, tasks=3, pool_size=50, num_prompts=8,
                        shard_size=500, single_worker_pairs=600, results_dir=tmp_path / "results")
    text = json.dumps(result)
    assert "pairs_per_s" in text and (tmp_path / "results").is_dir()
    assert any(p.suffix == ".json" for p in (tmp_path / "results").iterdir())
    assert "bytes per pair" in report(result)


def test_bench_cli_rejects_unknown_bench(capsys):
    assert main(["bench", "nope"]) == 2
