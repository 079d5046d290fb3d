"""The branch mirror's decisions, exactly (coordinator/branches.py): where to fork, which branch a
verdict keeps, where a resync keeps the draft's tokens, which forks are prepared. The schedule's
use of them, with workers, is in test_schedules.py."""

from specpipe.coordinator.branches import BranchTree
from specpipe.coordinator.schedules import ROOT_BRANCH, Block

PROMPT = [1, 2, 3, 4]


def tree_with_main(drafted: list[int], alternatives: dict[int, list[int]] | None = None) -> BranchTree:
    tree = BranchTree(PROMPT)
    tree.main_view.tokens += drafted
    tree.main_view.alternatives = dict(alternatives or {})
    return tree


def test_forks_nearest_first_within_the_budget_once_per_position():
    tree = tree_with_main([10, 11, 12, 13], {5: [21, 22], 4: [20], 7: [23]})
    forks = tree.forks_to_make(committed=4, max_branches=2)
    assert forks == [(4, 0, 20), (5, 0, 21)]  # nearest first; the budget (2) cuts rank 1 at 5
    for position, rank, token_id in forks:
        tree.add_fork(position, rank, token_id)
    assert tree.branches[1].tokens == PROMPT + [20] and tree.branches[1].fork_at == 4
    assert tree.branches[2].tokens == PROMPT + [10, 21] and tree.branches[2].rank == 0
    assert tree.forks_to_make(committed=4, max_branches=4) == [(7, 0, 23)]  # 4 and 5 are forked already
    tree.main_view.alternatives[3] = [30]
    assert tree.forks_to_make(committed=4, max_branches=9) == []  # 3 is committed


def test_main_line_that_agrees_goes_on_and_the_others_are_cancelled():
    tree = tree_with_main([10, 11, 12], {6: [40]})
    fork = tree.add_fork(5, 0, 30)
    pruned = tree.prune(PROMPT + [10, 11], start=4)
    assert (pruned.losers, pruned.forks_lost, pruned.promoted, pruned.sync_keep) == ([fork], 1, False, None)
    assert set(tree.branches) == {ROOT_BRANCH} and tree.main_view.tokens == PROMPT + [10, 11, 12]
    assert tree.main_view.alternatives == {6: [40]}  # unverified: kept


def test_the_longest_agreeing_fork_is_promoted():
    tree = tree_with_main([10, 11, 12])
    short, long = tree.add_fork(5, 0, 30), tree.add_fork(5, 1, 31)
    tree.branches[long].tokens = PROMPT + [10, 30, 50]  # (the same token as `short`, drafted further)
    tree.branches[short].tokens = PROMPT + [10, 30]
    pruned = tree.prune(PROMPT + [10, 30], start=4)
    assert pruned.promoted and pruned.sync_keep is None and sorted(pruned.losers) == [ROOT_BRANCH]
    assert tree.main == long and tree.main_ids == {ROOT_BRANCH, long} and tree.main_view.fork_at is None
    assert set(tree.branches) == {short, long}  # `short` agrees too: it stays (the next verdict decides)


def test_nothing_agrees_the_main_line_resyncs_keeping_up_to_the_first_difference():
    tree = tree_with_main([10, 11, 12, 13], {7: [60]})
    tree.main_view.forked = {7}
    pruned = tree.prune(PROMPT + [10, 99], start=4)  # rejected at 5: the correction 99
    assert not pruned.promoted and pruned.sync_keep == 5
    assert tree.main_view.tokens == PROMPT + [10, 99] and tree.main_view.job_end == 6
    assert tree.main_view.alternatives == {} and tree.main_view.forked == set()


def test_a_resync_past_the_drafted_tokens_keeps_what_was_drafted():
    tree = tree_with_main([10])  # the target decoded 3 tokens by itself while the draft had drafted 1
    pruned = tree.prune(PROMPT + [10, 11, 12], start=4)
    assert pruned.sync_keep == 5 and tree.main_view.tokens == PROMPT + [10, 11, 12]


def test_forks_are_prepared_once_when_their_holder_is_in_flight_and_they_are_due():
    tree = tree_with_main([10, 11, 12, 13])
    ended, drafting, unheld = tree.add_fork(5, 0, 30), tree.add_fork(6, 0, 31), tree.add_fork(8, 0, 32)
    tree.branches[ended].tokens += [40]  # its job (to 7) ended
    tree.branches[drafting].tokens += [41]
    tree.branches[drafting].job_end = 10  # more to come
    tree.branches[unheld].tokens += [42]
    holder = Block(start=4, token_ids=[10, 11, 12, 13], done_at=5.0)
    ready = tree.ready_to_prepare([holder], next_token_at=4.0)
    assert [(branch_id, block) for branch_id, _, block in ready] == [(ended, holder)]
    assert tree.ready_to_prepare([holder], next_token_at=4.0) == []  # prepared once
    late = tree.ready_to_prepare([holder], next_token_at=6.0)  # its next token comes after the verdict
    assert [branch_id for branch_id, _, _ in late] == [drafting]
