"""The batch-rounding measurement (launch/batch_rounding.py) on a tiny target built as a
target worker builds it: its bookkeeping (every row compared, draws only on rows that differed)
and its seeding (a rerun gives the same figures)."""

import torch

from specpipe.launch.batch_rounding import PREFIX, measure, target_like


def test_rows_are_compared_and_a_rerun_gives_the_same_figures(tiny_models):
    model, store = target_like(str(tiny_models["target"]))
    generator = torch.Generator().manual_seed(0)
    sequences = [
        torch.randint(1, model.config.vocab_size, (PREFIX + 8,), generator=generator).tolist() for _ in range(4)
    ]
    first = measure(model, store, sequences, trials=6, draws_per_row=50)
    assert 6 <= first.rows <= 6 * 8 and 0 <= first.rows_differing <= first.rows
    assert first.draws == 50 * first.rows_differing
    assert 0 <= first.race_flips <= first.draws and 0 <= first.inverse_cdf_flips <= first.draws
    assert measure(model, store, sequences, trials=6, draws_per_row=50) == first
