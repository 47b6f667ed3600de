"""The report code of benchmarks/recommend_layers.py and benchmarks/few_shot.py on hand-made
caches: the tables hold the cached values, means are over complete seeds only, a missing run is
named, the few-shot recipes stay apart, and the recommended layers reach the adaptation."""

from __future__ import annotations

import pytest

from .test_reproduction import _load_benchmark


@pytest.fixture(scope="module")
def recommend():
    return _load_benchmark("recommend_layers")


@pytest.fixture(scope="module")
def few_shot():
    return _load_benchmark("few_shot")


def _digits_cache(recommend, seeds, missing=()):
    args = recommend.parse_args(["--directions", "MNIST->USPS", "--seeds", *map(str, seeds)])
    cache = {}
    for job in recommend.plan(args, "reduced"):
        seed = job["seed"]
        cache[recommend.key(job, "diagnosis")] = {
            "recommendation": {"conv1.0": 0.9, "fc4": 1.0},
            "a_distance_before": {"conv1.0": 1.5, "fc4": 1.9},
            "a_distance_after": {"conv1.0": 1.6, "fc4": 1.3},
        }
        for offset, row in enumerate(recommend.ROWS):
            if (seed, row) not in missing:
                cache[recommend.key(job, row)] = {
                    "source_only": 80.0 + seed,
                    "adapted": 90.0 + seed + offset,
                    "seconds": 60.0,
                }
    return args, cache


def test_the_digits_table_holds_the_runs_and_means_over_complete_seeds(recommend):
    args, cache = _digits_cache(recommend, [1, 2, 3], missing={(3, "GAM, recommended layers")})
    text = "\n".join(recommend.direction_lines(args, "MNIST->USPS", cache))
    assert "| 1 | 81.0 | 91.0 | 92.0 | 93.0 | conv1.0 0.9, fc4 1 |" in text
    assert "| 3 | 83.0 | 93.0 | 94.0 | not run |" in text
    # seeds 1 and 2 only: ADDA 91, 92 -> 91.5 ± 0.7; recommended 93, 94 -> 93.5 ± 0.7
    assert "| **mean ± std of 2** | **81.5 ± 0.7** | **91.5 ± 0.7** | **92.5 ± 0.7** | " in text
    assert (
        "- seed 1: recommended layers +1.0 against GAM, default layers, +2.0 against ADDA" in text
    )
    assert "- seed 3: GAM, recommended layers not run (time)" in text


def test_the_recommended_row_adapts_with_the_diagnosis_layers(recommend, monkeypatch):
    seen = {}

    def fake_adapt(row, *args):
        seen["row"] = row
        raise RuntimeError("stop here")

    monkeypatch.setattr(recommend.R, "adapt_module", fake_adapt)
    monkeypatch.setattr(recommend.R, "load_domains", lambda *a: ([0] * 4, [0] * 4))
    monkeypatch.setattr(recommend.A, "source_network", lambda *a: "weights.pt")
    job = dict(direction="MNIST->USPS", root="", protocol="reduced", seed=10, iterations=5,
               row="GAM, recommended layers", layers={"conv2.0": 0.5, "fc4": 1.0})  # fmt: skip
    with pytest.raises(RuntimeError, match="stop here"):
        recommend.adapt(job)
    assert seen["row"]["layers"] == {"conv2.0": 0.5, "fc4": 1.0}
    assert seen["row"]["drift_weight"] == 1.0  # GAM (full)'s drift, not ADDA's 0


def test_the_seg_report_says_whether_the_rows_share_their_source_network(recommend):
    args = recommend.parse_args(["--seg-demo", "--seg-seeds", "20", "21"])
    rows = lambda miou: {"rows": {"source only": {"miou": miou}}}  # noqa: E731
    cache = {f"seg_demo/20/{row}": rows(0.06) for row in recommend.SEG_ROWS}
    cache.update({f"seg_demo/21/{row}": rows(0.06 + i) for i, row in enumerate(recommend.SEG_ROWS)})
    lines = recommend.same_source_lines(args, cache)
    assert "the same F_s in every row" in lines[0]
    assert "**F_s differs between rows**" in lines[1]


def test_the_few_shot_table_keeps_the_recipes_apart(few_shot):
    args = few_shot.parse_args(["--seeds", "1", "2", "--shots", "0", "5"])
    cache = {}
    for seed in (1, 2):
        for init, base in (("source only", 80.0), ("GAM", 90.0)):
            cache[few_shot.digits_key(seed, init, "", 0)] = {"value": base + seed}
            for recipe, shift in (("with the source set", 1.0), ("target images only", -20.0)):
                key = few_shot.digits_key(seed, init, recipe, 5)
                cache[key] = {"value": base + seed + shift}
    args.report = "/dev/null"
    text = few_shot.write_report(args, cache, "python benchmarks/few_shot.py")
    assert "| GAM, with the source set | 91.5 ± 0.7 | 92.5 ± 0.7 |" in text
    assert "| GAM, target images only | 91.5 ± 0.7 | 71.5 ± 0.7 |" in text
    assert "| source only, target images only | 81.5 ± 0.7 | 61.5 ± 0.7 |" in text
