"""The benchmark runs end to end and reports what the issue asks: times, ratios, peak memory."""

from __future__ import annotations

from posprobe.studies.bench import run_bench


def test_bench_reports_the_floor_posprobe_and_the_authors_protocol():
    r = run_bench(
        "resnet18",
        "random",
        n_train=6,
        n_test=2,
        image_size=32,
        feat_size=12,
        epochs=3,
        authors_epochs=1,
        repeats=2,
        photos=False,
        log=lambda m: None,
    )
    assert r.floor.wall_s > 0 and r.posprobe.wall_s > 0 and r.posprobe_warm.wall_s > 0
    assert r.authors.wall_s > r.authors.parts["measured"]  # 1 epoch of 1 pattern, extrapolated to 3 x 5
    assert "extrapolated from 1 epoch(s) x 1 pattern(s)" in r.authors_measured
    assert set(r.posprobe.parts) == {"encode+cache", "train 5 readouts", "encode+score tests"}
    assert r.b_over_a > 0 and r.c_over_b > 0 and r.floor.peak_rss_mb > 0
    text = r.report()
    assert "b/a = " in text and "c/b = " in text and "peak RSS MB" in text
    assert len(r.run_ratios) == 2 and "b/a of each interleaved run pair" in text  # the noise, shown
    assert set(r.to_dict()) >= {"b_over_a", "c_over_b", "b_over_a_cpu", "floor", "posprobe", "authors"}
