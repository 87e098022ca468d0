"""What the example measures and writes: AUC, the metrics CSV and the plot of loss and AUC."""

from __future__ import annotations

import csv
import math
import os
from collections import deque

import torch

COLUMNS = (
    "step", "samples", "seconds", "loss", "train_auc", "test_auc", "samples_per_s", "lr_sparse", "lr_dense", "rows",
    "evicted", "rss_mb",
)  # fmt: skip
# rows: the table's rows (all ranks); evicted: rows it gave up for new ids so far (all ranks);
# rss_mb: resident memory of rank 0's process. A CSV written before a column existed reads it as empty.


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, tied scores share their mean rank); NaN if one class."""
    scores, labels = scores.double().flatten(), labels.flatten()
    positives = float(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return math.nan
    sorted_scores, order = scores.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based mean rank of each tie group
    rank_sum = float(mean_rank[labels[order] == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


class RunningMetrics:
    """Loss and AUC over the most recent training batches of this rank."""

    def __init__(self, window: int) -> None:
        self.batches: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window)
        self.losses: deque[float] = deque(maxlen=window)

    def add(self, loss: float, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses.append(loss)
        self.batches.append((scores.detach().float().cpu(), labels.detach().cpu()))

    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan

    def auc(self) -> float:
        if not self.batches:
            return math.nan
        return auc(torch.cat([s for s, _ in self.batches]), torch.cat([lab for _, lab in self.batches]))


class MetricsCSV:
    """Rows of ``COLUMNS`` in a CSV file, rewritten whole at each row (it stays small).

    On resume it keeps the rows up to the resumed step (a column the old file lacks stays
    empty in them); a second row for the same step (the final evaluation right after a
    logged step) replaces the first.
    """

    def __init__(self, path: str, resume_step: int | None) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
            self.rows = [{key: row.get(key) or "" for key in COLUMNS} for row in kept]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._flush()

    def write(self, **row: float | int | None) -> None:
        values = {key: _format(row.get(key)) for key in COLUMNS}
        if self.rows and self.rows[-1]["step"] == values["step"]:
            self.rows.pop()
        self.rows.append(values)
        self._flush()

    def _flush(self) -> None:
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.path)


def _format(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_csv(path: str) -> dict[str, list[float]]:
    """Columns of a metrics CSV as lists of floats (NaN where a cell is empty)."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return {key: [float(row[key]) if row.get(key) else math.nan for row in rows] for key in COLUMNS}


def resident_mb() -> float:
    """This process's resident memory (VmRSS) in MB; NaN where /proc does not tell it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # the line reads "VmRSS:  123456 kB"
    except OSError:
        pass
    return math.nan


def plotting_unavailable() -> str | None:
    """Why the plot cannot be drawn (matplotlib does not import), or None if it can.

    The plot is optional: a run without matplotlib still trains, writes the CSV and reports.
    """
    try:
        import matplotlib  # noqa: F401
    except Exception as error:  # a missing or a broken install: either way, no plot
        return f"{type(error).__name__}: {error}"
    return None


def plot(csv_path: str, png_path: str, title: str) -> None:
    """Training loss, training AUC and held-out AUC against the step, from the metrics CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_csv(csv_path)
    steps = columns["step"]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(steps, columns["loss"], label="training loss (rank 0, recent batches)")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("log loss")
    loss_axis.legend()
    auc_axis.plot(steps, columns["train_auc"], label="training AUC (rank 0, recent batches)")
    tested = [(s, a) for s, a in zip(steps, columns["test_auc"]) if not math.isnan(a)]
    if tested:
        auc_axis.plot(*zip(*tested), "o-", label="held-out AUC")
    auc_axis.set_xlabel("step")
    auc_axis.set_ylabel("AUC")
    auc_axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
