"""A small, fast version of benchmarks/reproduce_digits.py on the real USPS/MNIST test files:
a few hundred iterations of USPS -> MNIST, one seed. Skipped when ../shared has no digits."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dam_lightning.data import LabelShift

from .conftest import REPO, SHARED_DIGITS


def _load_benchmark(name: str):
    """Import benchmarks/<name>.py (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmark():
    return _load_benchmark("reproduce_digits")


class RecordingCache:
    """Stands in for ResultCache: records each run's key and arguments instead of running it,
    and answers 90.0 for augmented-source runs (keys with "+"), 80.0 for the others."""

    def __init__(self):
        self.runs: dict = {}

    def get_or_run(self, key, run, *run_args):
        self.runs[key] = run_args
        return 90.0 if "+" in key else 80.0


@pytest.mark.slow
def test_gam_beats_source_only_on_usps_to_mnist(tmp_path):
    if not SHARED_DIGITS.is_dir():
        pytest.skip(f"real digits not available: {SHARED_DIGITS} does not exist")
    bench = _benchmark()
    assert bench.detect_protocol(str(SHARED_DIGITS)) == "reduced"
    source, target = bench.load_domains("USPS->MNIST", str(SHARED_DIGITS), "reduced")
    weights = tmp_path / "source.pt"
    source_only = bench.train_supervised(source, target, 0, 300, weights)
    gam = bench.adapt(bench.ADAPTATION_ROWS["GAM (full)"], source, target, 0, 300, weights)
    assert 40 < source_only < 75  # measured 59.1
    assert gam > source_only + 10  # measured 85.6 (80.6 with Gaussian matching every epoch)


def test_label_shift_removes_half_of_the_odd_digits_deterministically():
    labels = torch.arange(200) % 10
    base = torch.utils.data.TensorDataset(torch.zeros(200, 1), labels)
    shifted = LabelShift(base, drop="odd", fraction=0.5, seed=3)
    kept = torch.tensor([int(shifted[i][1]) for i in range(len(shifted))])
    counts = torch.bincount(kept, minlength=10).tolist()
    assert counts == [20, 10, 20, 10, 20, 10, 20, 10, 20, 10]
    assert LabelShift(base, drop="odd", fraction=0.5, seed=3).indices == shifted.indices
    assert LabelShift(base, drop="odd", fraction=0.5, seed=4).indices != shifted.indices
    with pytest.raises(ValueError, match="drop must be 'odd' or 'even'"):
        LabelShift(base, drop="prime")


def test_gaussian_ablation_runs_every_variant_once_and_the_decision_rows_on_extra_seeds(tmp_path):
    ablation = _load_benchmark("gaussian_ablation")
    args = ablation.parse_args(
        ["--extra-seeds", "11", "--directions", "USPS->MNIST", "--report", str(tmp_path / "a.md")]
    )
    jobs = ablation.plan(args, "reduced")
    seed10 = [j["variant"] for j in jobs if j["seed"] == 10 and j["iterations"] == 2000]
    seed11 = [j["variant"] for j in jobs if j["seed"] == 11]
    assert seed10 == list(ablation.VARIANTS)
    assert seed11 == ablation.DECISION_VARIANTS
    assert [j["iterations"] for j in jobs if j["iterations"] != 2000] == [10000]  # one long run

    # The report averages the seeds a row has and says so when a row has fewer than expected.
    cache = {
        ablation.run_key(j): {"validation": 80.0 + j["seed"], "held_out": 70.0, "curve": [],
                              "seconds": 60.0}
        for j in jobs
        if not (j["seed"] == 11 and j["variant"] == "+ Gaussian matching once")
    }  # fmt: skip
    text = ablation.write_report(args, "reduced", jobs, cache, "cmd")
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows[ablation.LONG_RUN + " *"].endswith("| 90.5 (70.0) |")  # mean of 90 and 91
    assert rows["+ Gaussian matching once *"].endswith("| 90.0 (70.0, n=1) |")
    assert rows["+ Gaussian matching every epoch, drift anchored at the matched weights"].endswith(
        "| 90.0 (70.0) |"
    )


def test_ablation_variants_option_runs_only_the_chosen_rows_and_keys_runs_by_source_network():
    ablation = _load_benchmark("gaussian_ablation")
    args = ablation.parse_args(
        ["--variants", ablation.LONG_RUN, "--extra-seeds", "11", "--source-iterations", "10000",
         "--long-iterations", "0"]
    )  # fmt: skip
    jobs = ablation.plan(args, "reduced")
    assert {j["variant"] for j in jobs} == {ablation.LONG_RUN}
    assert sorted({j["seed"] for j in jobs}) == [10, 11]
    # The same run from another source network is another cache entry.
    other = dict(jobs[0], source_iterations=2000)
    assert ablation.run_key(jobs[0]) != ablation.run_key(other)


def test_result_cache_shared_by_two_calls_keeps_both_calls_runs(tmp_path):
    """Two reproduce_digits calls (say one per direction) may write one cache file."""
    bench = _benchmark()
    path = tmp_path / "digits.json"
    meta = {"config": {"source_iterations": 10000}}
    first, second = bench.ResultCache(path, meta), bench.ResultCache(path, meta)
    first.get_or_run("MNIST->USPS/ADDA/0", lambda: 91.0)
    second.get_or_run("USPS->MNIST/ADDA/0", lambda: 90.0)
    first.get_or_run("MNIST->USPS/ADDA/1", lambda: 92.0)
    runs = bench.ResultCache(path, meta).data["runs"]
    assert runs == {"MNIST->USPS/ADDA/0": 91.0, "USPS->MNIST/ADDA/0": 90.0,
                    "MNIST->USPS/ADDA/1": 92.0}  # fmt: skip
    # A cache written with other settings is not mixed in: a call with new settings starts over.
    assert bench.ResultCache(path, {"config": {"source_iterations": 2000}}).data["runs"] == {}


def test_reproduce_rows_option_skips_unchosen_rows_but_always_trains_the_source(tmp_path):
    bench = _benchmark()
    args = bench.parse_args(["--rows", "GAM (full)", "--seeds", "0", "--directions", "USPS->MNIST"])
    cache = RecordingCache()
    bench.load_domains = lambda *a: (None, None)
    (tmp_path / "source10000").mkdir()
    (tmp_path / "source10000" / "USPS_MNIST_seed0.pt").write_bytes(b"")
    bench.run_table1(args, "reduced", cache, tmp_path)
    assert list(cache.runs) == ["USPS->MNIST/source only/0", "USPS->MNIST/GAM (full)/0"]


def test_augmented_rows_train_their_own_source_network_scaled_toward_the_target(tmp_path):
    """--augmented-rows: a second source network per seed, trained with RandomAffine that
    shrinks USPS digits (for MNIST) or enlarges MNIST digits (for USPS), kept apart from the
    plain one, and the chosen rows adapted from it; the report shows them in their own table."""
    bench = _benchmark()
    args = bench.parse_args(
        ["--rows", "ADDA", "--augmented-rows", "GAM (full)", "--seeds", "0",
         "--source-iterations", "2000", "--report", str(tmp_path / "digits.md")]
    )  # fmt: skip
    cache = RecordingCache()
    runs = cache.runs
    bench.load_domains = lambda *a: (None, None)
    for folder in ("source2000", "source2000_shrink", "source2000_enlarge"):
        for tag in ("USPS_MNIST", "MNIST_USPS"):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / f"{tag}_seed0.pt").write_bytes(b"")
    table1 = bench.run_table1(args, "reduced", cache, tmp_path)
    assert list(runs) == [
        "MNIST->USPS/source only/0", "MNIST->USPS/ADDA/0",
        "MNIST->USPS +enlarge/source only/0", "MNIST->USPS +enlarge/GAM (full)/0",
        "USPS->MNIST/source only/0", "USPS->MNIST/ADDA/0",
        "USPS->MNIST +shrink/source only/0", "USPS->MNIST +shrink/GAM (full)/0",
    ]  # fmt: skip
    *_, weights, augment = runs["USPS->MNIST +shrink/source only/0"]
    assert weights == tmp_path / "source2000_shrink" / "USPS_MNIST_seed0.pt"
    assert augment.zoom == (0.7, 1.0)
    *_, weights, augment = runs["MNIST->USPS +enlarge/source only/0"]
    assert weights == tmp_path / "source2000_enlarge" / "MNIST_USPS_seed0.pt"
    assert augment.zoom == (1.0, 1.4)
    assert runs["USPS->MNIST/source only/0"][-1] is None  # the paper's rows: no augmentation
    assert runs["USPS->MNIST +shrink/GAM (full)/0"][-1] == weights.parent.parent / (
        "source2000_shrink/USPS_MNIST_seed0.pt"
    )

    bench.write_report(args, "reduced", table1, {}, "cmd", 1.0)
    report = (tmp_path / "digits.md").read_text()
    augmented = report.split("## Table 1 with an augmented source")[1]
    assert "| GAM (full) | 90.0 | 90.0 | 95.7 ± 0.5 | 98.0 ± 0.5 |" in augmented
    assert "| source only | 90.0 | 90.0 |" in augmented
    assert "ADDA" not in augmented


def test_confusion_benchmark_counts_true_by_predicted_and_names_the_largest_confusions():
    confusion = _load_benchmark("confusion")

    class Fixed(torch.nn.Module):
        """Predicts the class stored in the input's single pixel."""

        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long(), 3).float()

    predicted = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    data = torch.utils.data.TensorDataset(predicted.view(-1, 1, 1, 1).float(), truth)
    matrix = confusion.confusion_matrix(Fixed(), data, num_classes=3)
    assert matrix.tolist() == [[2, 0, 0], [0, 1, 1], [1, 1, 2]]
    assert confusion.accuracy(matrix) == 100 * 5 / 8
    assert confusion.class_accuracy(matrix) == [100.0, 50.0, 50.0]
    # 1 -> 2 is half of class 1; 2 -> 0 and 2 -> 1 are a quarter of class 2 each.
    assert confusion.largest_confusions(matrix, count=1) == [(1, 2, 50.0)]


def test_reproduction_runs_the_paper_protocol_on_the_train_splits_when_they_are_present(tmp_path):
    from .test_digits_data import usps_line, write_mnist, write_usps

    bench = _benchmark()
    write_mnist(tmp_path, split="test", n=5)
    write_usps(tmp_path / "usps.t.bz2", [usps_line(1, 0.0)] * 3)
    assert bench.detect_protocol(str(tmp_path)) == "reduced"  # test splits only
    write_mnist(tmp_path, split="train", n=7)
    assert bench.detect_protocol(str(tmp_path)) == "reduced"  # USPS train still missing
    write_usps(tmp_path / "usps.bz2", [usps_line(2, 0.0)] * 4)
    assert bench.detect_protocol(str(tmp_path)) == "paper"
    source, target = bench.load_domains("USPS->MNIST", str(tmp_path), "paper")
    assert (len(source), len(target)) == (4, 7)
    source, target = bench.load_domains("MNIST->USPS", str(tmp_path), "reduced")
    assert (len(source), len(target)) == (5, 3)


def test_confusion_benchmark_adapts_each_source_network_with_several_seeds():
    confusion = _load_benchmark("confusion")
    args = confusion.parse_args(["--seeds", "10", "13", "--source-iterations", "2000"])
    jobs = confusion.plan(args, "reduced")
    assert [(j["seed"], j["adapt_seed"]) for j in jobs] == [(10, 10), (10, 1010), (13, 13),
                                                            (13, 1013)]  # fmt: skip
    keys = [confusion.run_key(j) for j in jobs]
    assert len(set(keys)) == 4
    assert keys[0] == "USPS->MNIST/10/2000/source2000"  # the first seed keeps the plain key


def test_confusion_benchmark_names_the_source_augmentation_in_its_keys():
    confusion = _load_benchmark("confusion")
    assert confusion.parse_args([]).source_augment is None
    assert confusion.parse_args(["--source-augment"]).source_augment == "shrink"  # bare flag
    args = confusion.parse_args(
        ["--source-augment", "enlarge", "--seeds", "10", "--source-iterations", "2000",
         "--adaptation-seeds", "1"]
    )  # fmt: skip
    [job] = confusion.plan(args, "reduced")
    assert confusion.run_key(job) == "USPS->MNIST/10/2000/source2000/enlarge"
    with pytest.raises(SystemExit):
        confusion.parse_args(["--source-augment", "stretch"])


def test_bare_rows_with_augmented_rows_runs_no_plain_source_network(tmp_path):
    bench = _benchmark()
    args = bench.parse_args(["--rows", "--augmented-rows", "GAM (full)", "--seeds", "0",
                             "--directions", "MNIST->USPS"])  # fmt: skip
    cache = RecordingCache()
    bench.load_domains = lambda *a: (None, None)
    (tmp_path / "source10000_enlarge").mkdir()
    (tmp_path / "source10000_enlarge" / "MNIST_USPS_seed0.pt").write_bytes(b"")
    table1 = bench.run_table1(args, "reduced", cache, tmp_path)
    assert list(cache.runs) == [
        "MNIST->USPS +enlarge/source only/0",
        "MNIST->USPS +enlarge/GAM (full)/0",
    ]
    assert not (tmp_path / "source10000" / "MNIST_USPS_seed0.pt").exists()
    args.report = str(tmp_path / "digits.md")
    bench.write_report(args, "reduced", table1, {}, "cmd", 1.0)
    report = (tmp_path / "digits.md").read_text()
    assert "## Table 1\n" not in report  # no empty paper-recipe table
    assert "| GAM (full) | 90.0 | 95.7 ± 0.5 |" in report


def test_default_cache_is_one_file_per_setting_so_other_settings_never_replace_it():
    bench = _benchmark()
    paper = bench.parse_args([])  # the paper's 10,000 iterations
    short = bench.parse_args(["--source-iterations", "2000", "--adapt-iterations", "2000"])
    assert bench.default_cache(short, "reduced").name == "digits_source2000_adapt2000_reduced.json"
    assert bench.default_cache(paper, "reduced") != bench.default_cache(short, "reduced")
    assert bench.default_cache(short, "paper") != bench.default_cache(short, "reduced")
