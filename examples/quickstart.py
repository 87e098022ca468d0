"""Quick start: a small click model on hash-table embeddings, trained in one process.

Users and items are arbitrary 64-bit ids that keep appearing over time. A planted
model decides the clicks; the trained model should rank held-out clicks well above
chance. Rows are trained by recis.optim.SparseAdamW, the dense tower by
recis.optim.AdamWTF, both under a warm-up learning-rate schedule.

    python examples/quickstart.py            # about 15 seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import AdamWTF, SparseAdamW

LATENT = 8


class ClickModel(nn.Module):
    """Dot product of user and item rows plus a small MLP over both."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.user = HashTable([dim], name="user")
        self.item = HashTable([dim], name="item")
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u, i = self.user(users), self.item(items)
        return (u * i).sum(-1) + self.mlp(torch.cat([u, i], -1)).squeeze(-1)


class PlantedClicks:
    """Clicks drawn from hidden user and item vectors; ids are scrambled 64-bit numbers."""

    def __init__(self, users: int, items: int, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.user_ids = torch.randint(-(2**63), 2**63 - 1, (users,), generator=self.gen)
        self.item_ids = torch.randint(-(2**63), 2**63 - 1, (items,), generator=self.gen)
        self.user_vec = torch.randn(users, LATENT, generator=self.gen)
        self.item_vec = torch.randn(items, LATENT, generator=self.gen)

    def batch(self, size: int, progress: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user ids, item ids, labels, the planted logits that drew the labels)."""
        # The id population widens over time, so new ids keep arriving during training.
        users = self._skewed(size, max(1, int(len(self.user_ids) * (0.5 + 0.5 * progress))))
        items = self._skewed(size, max(1, int(len(self.item_ids) * (0.5 + 0.5 * progress))))
        logits = (self.user_vec[users] * self.item_vec[items]).sum(-1) / LATENT**0.5 * 3
        labels = torch.bernoulli(torch.sigmoid(logits), generator=self.gen)
        return self.user_ids[users], self.item_ids[items], labels, logits

    def _skewed(self, size: int, population: int) -> torch.Tensor:
        # Zipf-like popularity: a few ids are frequent, most are rare.
        u = torch.rand(size, generator=self.gen)
        return (population**u - 1).long().clamp_(max=population - 1)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic."""
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    data = PlantedClicks(args.users, args.items, args.seed)
    model = ClickModel(args.dim)
    sparse_opt = SparseAdamW(filter_out_sparse_param(model), lr=0.01, weight_decay=1e-4)
    dense_opt = AdamWTF(model.parameters(), lr=0.003, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        for opt in (sparse_opt, dense_opt)
    ]
    loss_fn = nn.BCEWithLogitsLoss()

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", mininterval=1.0)
    for step in bar:
        users, items, labels, _ = data.batch(args.batch_size, step / args.steps)
        loss = loss_fn(model(users, items), labels)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        for schedule in schedules:
            schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", rows=len(model.user) + len(model.item))
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        users, items, labels, planted_logits = data.batch(20_000, 1.0)
        test_auc = auc(model(users, items), labels)
    print(f"AUC of the planted model itself on the same test batch: {auc(planted_logits, labels):.4f}")
    print(
        f"trained {args.steps} steps, {args.steps * args.batch_size / elapsed:,.0f} samples/s, "
        f"{len(model.user):,} user rows, {len(model.item):,} item rows"
    )
    print(f"test_auc: {test_auc:.4f}")


if __name__ == "__main__":
    main()
