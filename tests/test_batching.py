"""How global batches become learner shards and micro-batches (pure, no Ray)."""
from prefopt.loops import batching


def _pair(prompt_len: int, chosen_len: int, rejected_len: int, tag: int) -> dict:
    return {"kind": "pairs", "prompt_ids": [1] * prompt_len,
            "response_ids": [[2] * chosen_len, [3] * rejected_len], "tag": tag}


def test_sorted_split_keeps_every_example_once_and_balances_learners():
    batch = [_pair(3, n % 7 + 1, n % 5 + 1, n) for n in range(16)]
    shards = batching.split_for_learners(batch, 2, 4, sort_by_length=True)
    tags = sorted(ex["tag"] for shard in shards for micro in shard for ex in micro)
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
    sample = {"kind": "rollouts", "prompt_ids": [1, 2], "response_ids": [5, 6, 7]}
    assert batching.example_length(sample) == 5
