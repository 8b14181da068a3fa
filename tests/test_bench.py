"""`dnd bench data` at a small size: every number it reports is measured and consistent."""

import json

import numpy as np

from dnd_scale.bench_data import bench_data, bench_data_ranks, pair_checksum, report
from dnd_scale.cli import main


def test_bench_data_measures_write_and_read(tmp_path):
    result = bench_data(tmp_path / "run", pairs=3000, workers=2, tasks=3, pool_size=50, num_prompts=8,
                        shard_size=500, single_worker_pairs=600, results_dir=tmp_path / "results")
    text = json.dumps(result)
    assert "pairs_per_s" in text and (tmp_path / "results").is_dir()
    assert any(p.suffix == ".json" for p in (tmp_path / "results").iterdir())
    assert "bytes per pair" in report(result)


def test_bench_data_ranks_sees_every_pair_once(tmp_path):
    result = bench_data_ranks(tmp_path / "run", pairs=1200, ranks=2, workers=2, tasks=3, pool_size=50, num_prompts=8,
                              batch_size=16, shard_size=100, block_size=32, gather_pairs_per_rank=64,
                              resampled_pairs_per_rank=96, results_dir=tmp_path / "results", results_name="r")
    once = result["exactly_once"]
    assert once["passed"] and once["pairs_read"] == 1200 and once["checksum_read"] == once["checksum_written"]
    assert [r["pairs"] for r in result["resampled_index_only"]["per_rank"]] == [96, 96]
    assert result["partial_epoch_with_tokens_and_prompts"]["pairs"] == 128
    assert "Exactly once over one epoch: **passed**" in (tmp_path / "results" / "r.md").read_text()


def test_pair_checksum_sees_contents_move_between_pairs():
    rng = np.random.default_rng(0)
    pair_id, task, checkpoint, prompts = np.arange(6), rng.integers(0, 3, 6), rng.integers(0, 4, 6), rng.integers(0, 50, (6, 5))
    reference = pair_checksum(pair_id, task, checkpoint, prompts)
    order = rng.permutation(6)
    assert pair_checksum(pair_id[order], task[order], checkpoint[order], prompts[order]) == reference  # order-free
    swapped = prompts.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert pair_checksum(pair_id, task, checkpoint, swapped) != reference
    assert pair_checksum(pair_id, task, checkpoint, prompts[:, ::-1]) != reference  # prompt order counts


def test_bench_cli_rejects_unknown_bench(capsys):
    assert main(["bench", "nope"]) == 2


def test_convergence_criterion_compares_against_the_exact_run(monkeypatch):
    # The criterion: the Triton run may stray from the fp32 run at most as far as PyTorch's bf16 run.
    from dnd_scale import bench_convergence as bench

    def curves(triton_offset):
        exact = [1.0 / (1 + s) for s in range(40)]
        return {"fp32": exact, "eager": [v * 1.02 for v in exact], "triton": [v * (1 + triton_offset) for v in exact]}

    for offset, passed in ((0.02, True), (0.025, True), (0.05, False)):
        data = curves(offset)
        monkeypatch.setattr(bench, "_train_curve", lambda impl, *a, data=data: {"losses": data[impl], "seconds": 0.0})
        written = []
        partial = {}
        out = bench.bench_convergence("p", 1, 40, result=partial, on_curve=lambda: written.append(len(partial["curves"])))
        assert out is partial and written == [1, 2, 3]  # each curve is handed over as soon as it exists
        assert out["passed"] is passed, (offset, out["distance_to_fp32"])
        stored = {"curves": json.loads(json.dumps(out["curves"]))}  # a results file cut off after its curves
        assert bench.judge_convergence(stored)["distance_to_fp32"] == out["distance_to_fp32"]


def test_convergence_plot_is_a_png(tmp_path):
    from dnd_scale.bench_convergence import plot_convergence

    curves = {impl: {"losses": [1.0 / (1 + s + k) for s in range(30)], "seconds": 1.0} for k, impl in enumerate(("triton", "eager", "fp32"))}
    result = {"preset": "p", "batch": 1, "lr": 1e-4, "curves": curves, "distance_to_fp32": {"triton": 0.1, "torch": 0.2}, "passed": True}
    plot_convergence(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
