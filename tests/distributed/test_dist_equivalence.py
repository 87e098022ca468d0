"""W gloo ranks with local batches of b (mean loss) == one process with the W*b batch.

Every rank runs the same cases in one spawn: the three sparse optimizers, sharded and
replicated tables, with and without gradient accumulation. The global batches mix ids
repeated across ranks (a small Zipf-like vocabulary) with ids that appear on one rank
only (a fresh random 64-bit id per step).
"""

import pytest
from dist_harness import run_ranks
from two_table_training import (
    CASES,
    assert_owned_union_equals_reference,
    assert_replicas_equal_reference,
    reference_state,
    run_cases,
)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_with_local_batches_match_one_process_with_the_whole_batch(world_size):
    per_rank = run_ranks(world_size, run_cases)
    for case in CASES:
        optimizer_name, kind, accum, bias_correction = case
        reference = reference_state(optimizer_name, accum, bias_correction)
        results = [rank_results[case] for rank_results in per_rank]
        assert_owned_union_equals_reference(results, reference, case)
        if kind == "replicated":
            assert_replicas_equal_reference(results, reference, case)
