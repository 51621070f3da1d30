"""How global batches become learner shards and micro-batches (pure, no Ray)."""
from prefopt.data import batching
from prefopt.data.examples import Example
from prefopt.data.rollouts import RolloutSample


def _pair(prompt_len: int, chosen_len: int, rejected_len: int, tag: int) -> Example:
    return Example(prompt_ids=[1] * prompt_len, response_ids=[[2] * chosen_len, [3] * rejected_len],
                   scores=[1.0, 0.0], row=tag)


def test_sorted_split_keeps_every_example_once_and_balances_learners():
    batch = [_pair(3, n % 7 + 1, n % 5 + 1, n) for n in range(16)]
    shards = batching.split_for_learners(batch, 2, 4, sort_by_length=True)
    tags = sorted(ex.row for shard in shards for micro in shard for ex in micro)
    assert tags == list(range(16))
    assert [len(micro) for shard in shards for micro in shard] == [4] * 4
    for shard in shards:   # longest first within each learner's shard
        lengths = [batching.example_length(ex) for micro in shard for ex in micro]
        assert lengths == sorted(lengths, reverse=True)
    totals = [sum(batching.example_length(ex) for micro in shard for ex in micro) for shard in shards]
    assert abs(totals[0] - totals[1]) <= max(batching.example_length(ex) for ex in batch)


def test_sorted_micro_batches_pad_less_than_arrival_order():
    batch = [_pair(2, 30 if n % 2 else 2, 2, n) for n in range(8)]

    def padded_tokens(shards):
        return sum(len(micro) * max(batching.example_length(ex) for ex in micro)
                   for shard in shards for micro in shard)

    plain = batching.split_for_learners(batch, 1, 4)
    ordered = batching.split_for_learners(batch, 1, 4, sort_by_length=True)
    assert padded_tokens(ordered) < padded_tokens(plain)


def test_unsorted_split_is_contiguous():
    batch = list(range(8))
    assert batching.split_for_learners(batch, 2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_rollout_sample_length():
    sample = RolloutSample(prompt_ids=[1, 2], response_ids=[5, 6, 7])
    assert batching.example_length(sample) == 5


def test_budget_counts_the_packed_row():
    pair = _pair(5, 3, 4, 0)
    assert batching.Budget(100, share_prompts=True).cost(pair) == 5 + 3 + 4
    assert batching.Budget(100, share_prompts=False).cost(pair) == 2 * 5 + 3 + 4
    sample = RolloutSample(prompt_ids=[1, 2], response_ids=[5, 6, 7])
    assert batching.Budget(100).cost(sample) == 5


def test_token_budget_chunks_greedily_in_order():
    items = [_pair(2, n, n, n) for n in (4, 4, 4, 1, 1, 20)]       # costs 10, 10, 10, 4, 4, 42
    chunks = batching.chunk(items, batching.Budget(24))
    assert [[ex.row for ex in c] for c in chunks] == [[4, 4], [4, 1, 1], [20]]
    assert all(sum(batching.Budget(24).cost(ex) for ex in c) <= 24 for c in chunks[:2])
    assert batching.chunk(items, 4) == [items[:4], items[4:]]      # a count: fixed-size chunks


def test_token_budget_gives_every_learner_the_same_number_of_micro_batches():
    batch = [_pair(2, 30, 30, 0), _pair(2, 30, 30, 1)] + [_pair(2, 1, 1, n) for n in range(2, 8)]
    shards = batching.split_for_learners(batch, 2, batching.Budget(70), sort_by_length=True)
    counts = [len(shard) for shard in shards]
    assert counts[0] == counts[1] >= 2
    tags = sorted(ex.row for shard in shards for micro in shard for ex in micro)
    assert tags == list(range(8))
    assert all(micro for shard in shards for micro in shard)


def test_inference_plan_with_a_budget_restores_order():
    items = [_pair(2, n % 5 + 1, 1, n) for n in range(11)]
    plan, keep = batching.shard_for_inference(items, 2, batching.Budget(12))
    assert len(plan[0]) == len(plan[1])
    flat = [ex.row for r in range(2) for micro, k in zip(plan[r], keep[r]) if k for ex in micro]
    assert flat == list(range(11))
