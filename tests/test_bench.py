"""The benchmark runs end to end and reports what the issue asks: times, ratios, images/s, peak memory; the
synthetic paper-scale dataset has DUT-S's sizes and split."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import assert_one_line_error, invoke
from posprobe.errors import PosprobeError
from posprobe.studies.bench import run_bench
from posprobe.studies.bench_dataset import split_counts, write_synthetic_dataset

QUIET = {"log": lambda m: None}


def test_bench_reports_decoding_the_floor_posprobe_and_the_authors_protocol():
    r = run_bench(
        "resnet18",
        "random",
        n_train=6,
        n_test=2,
        image_size=32,
        feat_size=12,
        steps=3,
        repeats=2,
        photos=False,
        **QUIET,
    )
    assert r.updates == 3 and "3 SGD updates" in r.schedule
    assert r.decode.wall_s > 0 and r.floor.wall_s > 0 and r.posprobe.wall_s > 0 and r.posprobe_warm.wall_s > 0
    # 3 updates of 1 pattern measured (the cap of 20 is above the schedule), extrapolated to 5 patterns
    assert r.authors.wall_s > r.authors.parts["measured"]
    assert r.authors_measured == "extrapolated from 3 update(s) x 1 pattern(s) to 3 x 5"
    assert set(r.posprobe.parts) == {"encode+cache", "train 5 readouts", "encode+score tests"}
    assert r.b_over_a > 0 and r.c_over_b > 0 and r.floor.peak_rss_mb > 0
    assert r.n_images == 6 + 2 + 3 and r.images_per_s(r.floor) == pytest.approx(11 / r.floor.wall_s)
    text = r.report()
    assert "b/a = " in text and "c/b = " in text and "peak RSS MB" in text and "img/s" in text
    assert "(d) decode + resize alone" in text and "decode share of the floor" in text
    assert len(r.run_ratios) == 2 and "b/a of each interleaved run pair" in text  # the noise, shown
    assert set(r.to_dict()) >= {"b_over_a", "c_over_b", "b_over_a_cpu", "decode", "floor", "images_per_s"}


def test_the_official_profile_is_the_default_schedule_of_the_column():
    r = run_bench(
        "resnet18", "random", n_train=4, n_test=1, image_size=32, feat_size=12, authors_batches=1, repeats=1,
        photos=False, epochs=1, **QUIET,
    )  # fmt: skip
    assert r.updates == 1 and "1 passes over 4" in r.schedule.replace(" distinct training images", "")


def test_split_counts_follow_dut_s_and_pascal_s():
    assert split_counts(11_403) == (10_553, 850)
    assert split_counts(2) == (1, 1)
    assert split_counts(100) == (93, 7)
    with pytest.raises(PosprobeError, match="at least 2 images"):
        split_counts(1)


def test_synthetic_dataset_has_dut_s_sizes_and_is_seeded(tmp_path):
    train, test = write_synthetic_dataset(tmp_path / "a", 6, 2, seed=3, progress=False)
    files = sorted(train.glob("*.jpg"))
    assert len(files) == 6 and len(list(test.glob("*.jpg"))) == 2
    for f in [*files, *test.glob("*.jpg")]:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert max(img.size) == 400 and 300 <= min(img.size) <= 400
    again, _ = write_synthetic_dataset(tmp_path / "b", 6, 2, seed=3, progress=False)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(again.glob("*.jpg"))]


def test_bench_on_a_synthetic_jpeg_dataset_decodes_files_and_reuses_a_kept_folder(tmp_path):
    kept = tmp_path / "data"
    kwargs = dict(image_size=32, feat_size=12, steps=2, authors_batches=1, repeats=1, synthetic_dataset=5, **QUIET)
    r = run_bench("resnet18", "random", dataset_dir=kept, **kwargs)
    assert (r.n_train, r.n_test) == (4, 1) and "JPEG files at DUT-S sizes" in r.dataset
    assert len(list((kept / "train").glob("*.jpg"))) == 4
    stamp = (kept / "train" / "train00000.jpg").stat().st_mtime_ns
    run_bench("resnet18", "random", dataset_dir=kept, **kwargs)  # reused, not rewritten
    assert (kept / "train" / "train00000.jpg").stat().st_mtime_ns == stamp
    with pytest.raises(PosprobeError, match="holds 4 train and 1 test JPEGs"):
        run_bench("resnet18", "random", dataset_dir=kept, **{**kwargs, "synthetic_dataset": 9})


def test_bench_cli_refuses_bad_counts_in_one_line_before_writing(tmp_path):
    code, _, err = invoke("bench", "--synthetic-dataset", "1", "--dataset-dir", str(tmp_path / "d"), "--quiet")
    assert_one_line_error(code, err, "at least 2 images", "given 1")
    assert not (tmp_path / "d").exists()
    code, _, err = invoke("bench", "--profile", "slow", "--quiet")
    assert_one_line_error(code, err, "slow", "official")
