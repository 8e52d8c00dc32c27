from resnet_lab import bench, params


def test_bench_measures_three_pipelines_on_the_same_model():
    p = params.validate({"data": "synthetic", "synthetic_train": 64, "width": 4, "batch_size": 16, "steps": 2,
                         "warmup_steps": 1, "rounds": 2, "stock_workers": 0}, "bench")
    r = bench.run(p)
    assert set(r["img_per_s"]) == {"pipeline", "limit", "stock"}
    assert all(len(v) == 2 and min(v) > 0 for v in r["rounds"].values())
    assert r["pipeline_over_limit"] == r["img_per_s"]["pipeline"] / r["img_per_s"]["limit"]
    assert "pipeline / stock" in bench.describe(r)
