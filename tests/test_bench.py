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


def test_convergence_criterion_compares_against_the_exact_run(monkeypatch):
    # The criterion: the Triton run may stray from the fp32 run at most as far as PyTorch's bf16 run.
    from dnd_kernels import bench

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
    from dnd_kernels.bench import plot_convergence

    curves = {impl: {"losses": [1.0 / (1 + s + k) for s in range(30)], "seconds": 1.0} for k, impl in enumerate(("triton", "eager", "fp32"))}
    result = {"preset": "p", "batch": 1, "lr": 1e-4, "curves": curves, "distance_to_fp32": {"triton": 0.1, "torch": 0.2}, "passed": True}
    plot_convergence(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
