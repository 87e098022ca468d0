"""The DeepFM example end to end (tiny runs, one process and 2 ranks under torchrun) and its Criteo TSV reader."""

import csv
import importlib.util
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepfm"
TRAIN = EXAMPLE / "train.py"
TINY = ["--batch-size", "256", "--test-samples", "4000", "--warmup-steps", "5", "--log-every", "10"]
DEADLINE_S = 240
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_data_module():
    spec = importlib.util.spec_from_file_location("deepfm_data", EXAMPLE / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


criteo = _load_data_module()


def _run(command: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _one_process(*args: str) -> str:
    return _run([sys.executable, str(TRAIN), *TINY, *args])


def _two_ranks(*args: str) -> str:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return _run([*torchrun, str(TRAIN), *TINY, *args])


def _test_auc(stdout: str) -> float:
    last_line = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"test_auc: (0\.\d{4}|1\.0000)", last_line)
    assert match, stdout
    return float(match.group(1))


def _metrics(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _assert_outputs(out_dir: Path, last_step: int) -> list[dict[str, str]]:
    rows = _metrics(out_dir)
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == last_step, steps
    assert rows[-1]["test_auc"], rows[-1]
    assert all(0.0 <= float(row["train_auc"]) <= 1.0 and math.isfinite(float(row["loss"])) for row in rows)
    assert (out_dir / "plot.png").read_bytes()[:8] == PNG_MAGIC
    return rows


# What the first line says of each layout's tables, one process (HashTable) or several ranks (ShardedHashTable).
TABLES = {
    "per-feature": "52 per-feature tables (first-order dim 1, FM factors dim 16) coalesced into 2 {}s of",
    "coalesced": "one coalesced {} of",
    "per-feature-separate": "52 per-feature {}s (first-order dim 1, FM factors dim 16) of",
}


# --------------------------------------------------------------------------- 2 ranks under torchrun
@pytest.mark.timeout(3 * DEADLINE_S)
@pytest.mark.parametrize("layout", ["per-feature", "coalesced"])
def test_two_ranks_write_csv_plot_checkpoint_and_resume_continues_exactly(tmp_path, layout):
    run = ["--tables", layout, "--steps", "40", "--eval-every", "20", "--checkpoint-every", "10"]
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"

    first = _two_ranks(*run, "--stop-after", "25", "--out-dir", str(interrupted))
    tables = "over 2 ranks (gloo): EmbeddingEngine, " + TABLES[layout].format("ShardedHashTable")
    assert tables in first and "ShardedOptimizer" in first and "(DDP)" in first, first
    assert "trained steps 0-25 " in first
    _test_auc(first)
    _assert_outputs(interrupted, 25)
    assert (interrupted / "checkpoints" / "latest").read_text().strip().endswith("step25")

    # The same checkpoint also resumes in one process (the checkpoint reshards; the stream goes on).
    one_process = tmp_path / "one_process"
    shutil.copytree(interrupted, one_process)
    resharded = _one_process(*run, "--resume", "--out-dir", str(one_process))
    assert "DeepFM: EmbeddingEngine, " + TABLES[layout].format("HashTable") in resharded, resharded
    assert "trained steps 25-40 " in resharded
    _test_auc(resharded)
    samples = {int(row["step"]): int(row["samples"]) for row in _assert_outputs(one_process, 40)}
    assert samples == {10: 10 * 512, 20: 20 * 512, 25: 25 * 512, 30: 25 * 512 + 5 * 256, 40: 25 * 512 + 15 * 256}

    resumed = _two_ranks(*run, "--resume", "--out-dir", str(interrupted))
    assert "trained steps 25-40 " in resumed
    uninterrupted = _two_ranks(*run, "--out-dir", str(whole))
    assert "trained steps 0-40 " in uninterrupted

    # Resuming from step 25 reaches exactly the model of a run that never stopped: the same
    # table size and held-out AUC at every evaluation after the checkpoint.
    assert _test_auc(resumed) == _test_auc(uninterrupted) > 0.5
    resumed_rows, whole_rows = _assert_outputs(interrupted, 40), _assert_outputs(whole, 40)
    assert [int(row["step"]) for row in resumed_rows] == [10, 20, 25, 30, 40]
    for step in (30, 40):
        a = next(row for row in resumed_rows if int(row["step"]) == step)
        b = next(row for row in whole_rows if int(row["step"]) == step)
        assert (a["rows"], a["test_auc"], a["lr_sparse"]) == (b["rows"], b["test_auc"], b["lr_sparse"]), (a, b)


@pytest.mark.timeout(DEADLINE_S + 30)
def test_two_ranks_on_a_tsv_file_whose_parts_differ_in_length_stop_together(tmp_path):
    path = tmp_path / "day.tsv"
    rng = random.Random(1)
    _write_tsv(path, 1000, rng)
    with open(path, "a") as file:  # short lines at the end: rank 1's byte range holds many more lines
        file.writelines(f"{rng.randint(0, 1)}" + "\t" * 39 + "\n" for _ in range(1000))
    lines = [len(criteo.CriteoTSV(str(path), rank, 2, 0.0, 0.95).read_all()) for rank in range(2)]
    batches = [math.ceil(n / 256) for n in lines]
    assert batches[0] < batches[1], lines
    stdout = _two_ranks("--data", str(path), "--eval-every", "0", "--out-dir", str(tmp_path / "run"))
    _test_auc(stdout)
    assert f"trained steps 0-{batches[0]} " in stdout, (lines, stdout)


@pytest.mark.timeout(DEADLINE_S + 30)
def test_two_ranks_baseline_embedding_bag_with_sparse_adam(tmp_path):
    stdout = _two_ranks(
        "--baseline", "--baseline-rows", "100000", "--steps", "20", "--eval-every", "0", "--out-dir", str(tmp_path)
    )
    assert "over 2 ranks (gloo): nn.EmbeddingBag of 100,000 rows" in stdout and "torch.optim.SparseAdam" in stdout
    _test_auc(stdout)
    _assert_outputs(tmp_path, 20)


@pytest.mark.timeout(DEADLINE_S + 30)
def test_two_ranks_bounded_tables_stay_within_capacity_per_rank(tmp_path):
    run = ["--capacity", "5000", "--eviction", "lfu", "--steps", "20", "--eval-every", "0", "--checkpoint-every", "0"]
    stdout = _two_ranks(*run, "--tables", "per-feature", "--out-dir", str(tmp_path))
    assert "2 ShardedHashTables of 10,000 ids (capacity 5,000 per rank, lfu)" in stdout, stdout
    _test_auc(stdout)
    rows = _assert_outputs(tmp_path, 20)
    _assert_bounded(rows, 2 * 5000)


# --------------------------------------------------------------------------- one process
def _assert_bounded(rows: list[dict[str, str]], capacity: int) -> None:
    """The table was full and evicting at every logged step, never over ``capacity``; memory was logged."""
    assert all(int(row["rows"]) <= capacity for row in rows), rows
    evicted = [int(row["evicted"]) for row in rows]
    assert evicted == sorted(evicted) and evicted[0] > 0, evicted
    assert all(float(row["rss_mb"]) > 0 for row in rows), rows


@pytest.mark.timeout(3 * DEADLINE_S)
def test_one_process_bounded_table_evicts_within_capacity_and_resumes_an_old_csv(tmp_path):
    run = ["--capacity", "8000", "--grad-accum", "2", "--steps", "30", "--eval-every", "0", "--checkpoint-every", "10"]
    stopped = _one_process(*run, "--tables", "coalesced", "--stop-after", "10", "--out-dir", str(tmp_path))
    assert "one coalesced HashTable of 8,000 rows of dim 17 for 26 features (capacity 8,000 per rank, lru)" in stopped
    first = _metrics(tmp_path)
    _assert_bounded(first, 8000)

    # A CSV written before the evicted and rss_mb columns existed: --resume keeps its rows and goes on.
    old = ["step", "samples", "seconds", "loss", "train_auc", "test_auc", "samples_per_s", "lr_sparse", "lr_dense"]
    with open(tmp_path / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, old + ["rows"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(first)
    resumed = _one_process(*run, "--tables", "coalesced", "--resume", "--out-dir", str(tmp_path))
    assert "trained steps 10-30 " in resumed
    rows = _assert_outputs(tmp_path, 30)
    assert [int(row["step"]) for row in rows] == [10, 20, 30]
    assert rows[0]["rows"] == first[0]["rows"] and rows[0]["evicted"] == rows[0]["rss_mb"] == ""
    _assert_bounded(rows[1:], 8000)

    # The checkpoint carries what eviction reads and counts: the run goes on as one that never stopped.
    whole = _one_process(*run, "--tables", "coalesced", "--out-dir", str(tmp_path / "whole"))
    assert _test_auc(resumed) == _test_auc(whole)
    whole_rows = _metrics(tmp_path / "whole")
    assert [(r["rows"], r["evicted"]) for r in rows[1:]] == [(r["rows"], r["evicted"]) for r in whole_rows[1:]]


@pytest.mark.timeout(3 * DEADLINE_S)
def test_one_process_separate_tables_share_the_capacity_and_resume_only_in_their_layout(tmp_path):
    run = ["--tables", "per-feature-separate", "--capacity", "7800", "--steps", "20", "--eval-every", "0"]
    run += ["--checkpoint-every", "10"]
    stopped = _one_process(*run, "--stop-after", "10", "--out-dir", str(tmp_path))
    assert "52 per-feature HashTables (first-order dim 1, FM factors dim 16) of " in stopped, stopped
    assert "(capacity 7,800 per rank: 300 per feature, lru)" in stopped, stopped
    _assert_bounded(_metrics(tmp_path), 7800)

    # Another layout's tables cannot take this checkpoint: a clear error, and the checkpoint stays usable.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    other = [
        sys.executable,
        str(TRAIN),
        *TINY,
        *run[2:],
        "--tables",
        "coalesced",
        "--resume",
        "--out-dir",
        str(tmp_path),
    ]
    refused = subprocess.run(other, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert refused.returncode != 0
    assert "resumes only with the table layout that wrote it; this run has --tables coalesced" in refused.stderr

    resumed = _one_process(*run, "--resume", "--out-dir", str(tmp_path))
    whole = _one_process(*run, "--out-dir", str(tmp_path / "whole"))
    assert "trained steps 10-20 " in resumed
    assert _test_auc(resumed) == _test_auc(whole)
    rows, whole_rows = _metrics(tmp_path), _metrics(tmp_path / "whole")
    assert [(r["rows"], r["evicted"]) for r in rows] == [(r["rows"], r["evicted"]) for r in whole_rows]
    _assert_bounded(rows, 7800)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "--tables", "coalesced"], "--tables lays out recis tables"),
        (["--tables", "per-feature-separate", "--capacity", "25"], "--capacity 25 is shared by the 26 features"),
    ],
)
def test_table_layout_flags_that_do_not_fit_are_refused_before_training(args, message):
    result = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=DEADLINE_S)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.timeout(DEADLINE_S + 30)
def test_one_process_with_tf_optimizers_and_grad_accumulation_learns(tmp_path):
    stdout = _one_process(
        "--steps", "40", "--grad-accum", "2", "--sparse-opt", "adamw_tf", "--dense-opt", "adamw_tf",
        "--eval-every", "20", "--checkpoint-every", "0", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert "DeepFM: EmbeddingEngine, " in stdout and "SparseAdamWTF" in stdout and "dense part AdamWTF" in stdout
    assert _test_auc(stdout) > 0.55
    rows = _assert_outputs(tmp_path, 40)
    assert [int(row["step"]) for row in rows] == [10, 20, 30, 40]
    assert rows[1]["test_auc"] and not rows[2]["test_auc"]  # evaluated every 20 steps
    assert int(rows[-1]["samples"]) == 40 * 2 * 256
    assert not (tmp_path / "checkpoints").exists()


# Runs the example with ``import matplotlib`` failing as if it were not installed; the example is not told.
WITHOUT_MATPLOTLIB = (
    "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.timeout(DEADLINE_S + 30)
def test_one_process_without_matplotlib_warns_at_start_and_still_writes_csv_and_test_auc(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = ["--steps", "20", "--eval-every", "0", "--checkpoint-every", "0", "--out-dir", str(tmp_path)]
    command = [sys.executable, "-c", WITHOUT_MATPLOTLIB, str(TRAIN), *TINY, *run]
    result = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "matplotlib" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: matplotlib does not import"), result.stderr
    assert result.stderr.index(warnings[0]) < result.stderr.index("train:")  # at start, before the progress bar
    _test_auc(result.stdout)
    assert f"wrote {tmp_path / 'metrics.csv'}\n" in result.stdout and "plot.png" not in result.stdout
    assert [int(row["step"]) for row in _metrics(tmp_path)] == [10, 20]
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.timeout(DEADLINE_S + 30)
def test_one_process_baseline_learns(tmp_path):
    stdout = _one_process(
        "--baseline", "--baseline-rows", "100000", "--steps", "40", "--grad-accum", "2", "--out-dir", str(tmp_path)
    )
    assert "nn.EmbeddingBag" in stdout
    assert _test_auc(stdout) > 0.55


@pytest.mark.timeout(3 * DEADLINE_S)
def test_one_process_tsv_resume_continues_where_the_file_was_left(tmp_path):
    path = tmp_path / "day.tsv"
    _write_tsv(path, 3000, random.Random(2))
    steps = math.ceil(len(criteo.CriteoTSV(str(path), 0, 1, 0.0, 0.95).read_all()) / 100)
    run = ["--data", str(path), "--batch-size", "100", "--eval-every", "0", "--checkpoint-every", "100"]
    stopped = _one_process(*run, "--stop-after", "11", "--out-dir", str(tmp_path / "a"))
    assert "trained steps 0-11 " in stopped
    resumed = _one_process(*run, "--resume", "--out-dir", str(tmp_path / "a"))
    whole = _one_process(*run, "--out-dir", str(tmp_path / "b"))
    assert f"trained steps 11-{steps} " in resumed
    assert f"trained steps 0-{steps} " in whole
    assert _test_auc(resumed) == _test_auc(whole)


# --------------------------------------------------------------------------- the Criteo TSV reader
def _line(rng: random.Random) -> tuple[str, list]:
    label = rng.randint(0, 1)
    ints = [rng.choice(["", str(rng.randint(-3, 10**6))]) for _ in range(13)]
    cats = [rng.choice(["", f"{rng.getrandbits(32):08x}"]) for _ in range(26)]
    return "\t".join([str(label), *ints, *cats]) + "\n", [label, ints, cats]


def _write_tsv(path: Path, lines: int, rng: random.Random) -> list:
    parsed = []
    with open(path, "w", newline="") as file:
        for _ in range(lines):
            text, fields = _line(rng)
            file.write(text)
            parsed.append(fields)
    return parsed


def _expected(fields: list) -> tuple[float, list[float], list[int]]:
    label, ints, cats = fields
    numeric = [math.copysign(math.log1p(abs(int(x))), int(x)) if x else 0.0 for x in ints]
    ids = [(f << 33) | (int(c, 16) if c else 1 << 32) for f, c in enumerate(cats)]
    return float(label), numeric, ids


def test_reader_parses_labels_numeric_and_categorical_fields(tmp_path):
    path = tmp_path / "day.tsv"
    fields = _write_tsv(path, 50, random.Random(0))
    batch = criteo.CriteoTSV(str(path), 0, 1).read_all()
    assert len(batch) == 50
    for i, sample in enumerate(fields):
        label, numeric, ids = _expected(sample)
        assert batch.labels[i].item() == label
        torch.testing.assert_close(batch.numeric[i], torch.tensor(numeric, dtype=torch.float32))
        assert batch.categorical[i].tolist() == ids
    # Every (feature, value) pair gets its own id: no feature shares an id with another.
    assert len({(i >> 33) for i in batch.categorical.flatten().tolist()}) == 26


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_reader_parts_cover_every_line_once_in_order(tmp_path, world_size):
    path = tmp_path / "day.tsv"
    fields = _write_tsv(path, 101, random.Random(world_size))
    labels = []
    for rank in range(world_size):
        part = criteo.CriteoTSV(str(path), rank, world_size)
        for batch in part.batches(8):
            assert len(batch) <= 8
            labels += batch.categorical[:, 0].tolist()
    assert labels == [_expected(sample)[2][0] for sample in fields]


def test_reader_train_and_held_out_ranges_are_disjoint_and_complete(tmp_path):
    path = tmp_path / "day.tsv"
    fields = _write_tsv(path, 200, random.Random(5))
    ids = []
    for begin, end in ((0.0, 0.9), (0.9, 1.0)):
        for rank in range(2):
            ids += criteo.CriteoTSV(str(path), rank, 2, begin, end).read_all().categorical[:, 0].tolist()
    assert ids == [_expected(sample)[2][0] for sample in fields]


def test_reader_resumes_from_its_position_across_epochs(tmp_path):
    path = tmp_path / "day.tsv"
    _write_tsv(path, 30, random.Random(3))
    whole = [b.categorical[:, 0].tolist() for b in criteo.CriteoTSV(str(path), 1, 2).stream(4, epochs=2)]
    per_epoch = len(whole) // 2
    for taken_count in (1, per_epoch, per_epoch + 1):  # mid-epoch, at the end of one, in the next
        reader = criteo.CriteoTSV(str(path), 1, 2)
        stream = reader.stream(4, epochs=2)
        taken = [next(stream).categorical[:, 0].tolist() for _ in range(taken_count)]
        position = reader.position
        assert position[0] == (taken_count - 1) // per_epoch
        rest = [b.categorical[:, 0].tolist() for b in criteo.CriteoTSV(str(path), 1, 2).stream(4, 2, position)]
        assert taken + rest == whole


def test_reader_refuses_a_line_with_missing_fields(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match="40 tab-separated fields, this one 3"):
        criteo.CriteoTSV(str(path), 0, 1).read_all()


def test_synthetic_ids_follow_zipf_and_keep_arriving():
    data = criteo.SyntheticCriteo(seed=0, lifetime=1_000_000)
    generator = torch.Generator().manual_seed(0)
    early, _ = data.batch(20_000, 0, generator)
    late, _ = data.batch(20_000, 2_000_000, generator)
    feature = 9  # Criteo's C10: 93,145 values
    early_ids, late_ids = early.categorical[:, feature], late.categorical[:, feature]
    counts = torch.unique(early_ids, return_counts=True)[1].sort(descending=True).values
    assert counts[0] > 50 * counts[100]  # a few values are frequent, most are rare
    assert torch.isin(late_ids, early_ids).float().mean() < 0.1  # two lifetimes later: mostly new ids
    small = 8  # C9: 3 values, never renewed
    assert set(late.categorical[:, small].tolist()) == set(early.categorical[:, small].tolist())


def test_synthetic_planted_model_is_learnable_signal():
    data = criteo.SyntheticCriteo(seed=0)
    batch, logits = data.batch(20_000, 0, torch.Generator().manual_seed(1))
    order = logits.argsort()
    labels = batch.labels[order]
    assert 0.15 < batch.labels.mean() < 0.35  # a Criteo-like click rate
    assert labels[-2000:].mean() > 3 * labels[:2000].mean()  # the planted logits rank clicks well above chance


def test_readme_main_command_runs_this_example_on_two_ranks():
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first_command = re.search(r"```bash\n([^\n]*)", quick_start).group(1)
    assert first_command.startswith(
        "bash scripts/setup.sh && torchrun --standalone --nproc_per_node 2 examples/deepfm/train.py"
    ), first_command
