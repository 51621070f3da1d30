"""Pairs without a prompt field (the prompt is the start chosen and rejected share, as TRL's
``extract_prompt`` cuts it) and the per-pair ``margin`` / ``weight`` fields of the policy's pair
objectives (DPO / cDPO with ODPO's offset, IPO and SimPO with weights)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from trl.data_utils import extract_prompt

from data_helpers import write_jsonl  # noqa: E402
from prefopt.config_schema import DataConfig
from prefopt.data import collate_examples, load_preference_data
from prefopt.data.examples import Example, detect_kind, split_implicit_prompt
from prefopt.errors import ConfigError, DataError
from prefopt.objectives import PolicyOutput
from prefopt.objectives.dpo import DPO, IPO, dpo_loss
from prefopt.objectives.reward_model import bradley_terry_loss
from prefopt.objectives.simpo import SimPO, simpo_loss

# Anthropic HH-shaped rows (text, no prompt field): single and multi-turn; in the third the two
# answers share their first letter, so TRL's cut (and ours) falls inside the answer.
HH = [
    {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list swear words, "
               "but I can explain why people find some words offensive.",
     "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list."},
    {"chosen": "\n\nHuman: How do I make a cake?\n\nAssistant: What kind of cake?\n\nHuman: Chocolate."
               "\n\nAssistant: Mix flour, sugar, cocoa, eggs and butter, then bake for 30 minutes at 180C.",
     "rejected": "\n\nHuman: How do I make a cake?\n\nAssistant: What kind of cake?\n\nHuman: Chocolate."
                 "\n\nAssistant: Buy one at the store."},
    {"chosen": "\n\nHuman: Can you help me with my homework?\n\nAssistant: Sure, what is the question?",
     "rejected": "\n\nHuman: Can you help me with my homework?\n\nAssistant: Sorry, I can't."},
    {"chosen": "\n\nHuman: Why is the sky blue?\n\nAssistant: Sunlight scatters off air molecules, and blue "
               "light scatters the most.",
     "rejected": "\n\nHuman: Why is the sky blue?\n\nAssistant: Because it reflects the ocean."},
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = [
    {"chosen": [user("What color is the sky?"), assistant("It is blue.")],
     "rejected": [user("What color is the sky?"), assistant("It is green.")]},
    {"chosen": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Name a fruit."),
                assistant("An apple.")],
     "rejected": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Name a fruit."),
                  assistant("A carrot.")]},
]


def load(path, tok, cache, **kw):
    kw.setdefault("eval_fraction", 0.0)
    kw.setdefault("max_length", 1024)
    kw.setdefault("max_prompt_length", 512)
    return load_preference_data(DataConfig(path=str(path), **kw), tok, seed=0, cache_dir=cache)


def plain_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- implicit prompts

def test_split_implicit_prompt_equals_trl_extract_prompt():
    for row in HH + CONVERSATIONS:
        trl = extract_prompt(row)
        assert split_implicit_prompt(row["chosen"], row["rejected"]) == (trl["prompt"], trl["chosen"], trl["rejected"])
    # HH: the prompt ends with the assistant tag, the responses start with the space TRL moves back
    for row in (HH[0], HH[1], HH[3]):
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        assert prompt.endswith("\n\nAssistant:") and chosen.startswith(" ") and rejected.startswith(" ")
    assert split_implicit_prompt(HH[2]["chosen"], HH[2]["rejected"])[0].endswith("\n\nAssistant: S")  # as TRL


def test_detect_kind_takes_pairs_without_a_prompt():
    cfg = DataConfig()
    assert detect_kind(HH[0], cfg, source="x", row_index=0) == "pairs"
    assert detect_kind(CONVERSATIONS[0], cfg, source="x", row_index=0) == "pairs"


def test_hh_rows_tokenize_trl_prompt_and_responses(tmp_path, tok, cache):
    """Text rows stay plain text: prompt with bos, responses without special tokens plus eos; the
    same examples as rows giving TRL's prompt explicitly."""
    data = load(write_jsonl(tmp_path / "hh.jsonl", HH), tok, cache)
    assert data.kind == "pairs" and data.num_skipped == 0 and len(data.train) == len(HH)
    eos = tok.eos_token_id
    for i, (row, ex) in enumerate(zip(HH, data.train)):
        trl = extract_prompt(row)
        assert ex.row == i and ex.scores == [1.0, 0.0] and ex.margin is None and ex.weight is None
        assert ex.prompt_ids == tok(trl["prompt"])["input_ids"] and ex.prompt_ids[0] == tok.bos_token_id
        assert ex.response_ids == [plain_ids(tok, trl["chosen"]) + [eos], plain_ids(tok, trl["rejected"]) + [eos]]
        assert tok.decode(ex.prompt_ids, skip_special_tokens=True) == trl["prompt"]
    explicit = [extract_prompt(row) for row in HH]
    assert load(write_jsonl(tmp_path / "explicit.jsonl", explicit), tok, cache).train == data.train


def test_conversations_take_shared_messages_as_the_chat_prompt(tmp_path, tok, cache):
    data = load(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS), tok, cache)
    for row, ex in zip(CONVERSATIONS, data.train):
        trl = extract_prompt(row)
        assert trl["chosen"] == [row["chosen"][-1]] and trl["rejected"] == [row["rejected"][-1]]
        prompt_text = tok.apply_chat_template(trl["prompt"], add_generation_prompt=True, tokenize=False)
        assert ex.prompt_ids == plain_ids(tok, prompt_text)   # the template writes bos itself
        for ids, messages in zip(ex.response_ids, (row["chosen"], row["rejected"])):
            full = tok.apply_chat_template(messages, tokenize=False)
            assert ids == plain_ids(tok, full[len(prompt_text):])
    explicit = [extract_prompt(row) for row in CONVERSATIONS]
    assert load(write_jsonl(tmp_path / "explicit.jsonl", explicit), tok, cache).train == data.train


def test_a_row_with_a_prompt_keeps_it(tmp_path, tok, cache):
    """An explicit prompt is not re-derived, even where chosen and rejected share a start."""
    row = {"prompt": "Q?", "chosen": "Yes, kind.", "rejected": "Yes, rude."}
    (ex,) = load(write_jsonl(tmp_path / "p.jsonl", [row]), tok, cache).train
    assert ex.prompt_ids == tok("Q?")["input_ids"]
    assert ex.response_ids[0] == plain_ids(tok, "Yes, kind.") + [tok.eos_token_id]


HH_PROMPT = "\n\nHuman: Is it raining?\n\nAssistant:"
U, A = user("Is it raining?"), assistant("Yes.")
# (case id, bad row, field named in the error, a fragment of the message)
BAD = [
    ("text-identical", {"chosen": HH_PROMPT + " Yes.", "rejected": HH_PROMPT + " Yes."}, "rejected", "identical"),
    ("text-nothing-shared", {"chosen": "Yes.", "rejected": "No."}, "prompt", "share no leading text"),
    ("text-blank-shared", {"chosen": "\n\nYes.", "rejected": "\n\nNo."}, "prompt", "share no leading text"),
    ("text-prefix", {"chosen": HH_PROMPT + " Yes.", "rejected": HH_PROMPT + " Yes. It is."}, "chosen",
     "nothing is left of it"),
    ("text-blank-rest", {"chosen": HH_PROMPT + "\n", "rejected": HH_PROMPT + " Yes."}, "chosen",
     "nothing but blank text is left"),
    ("text-and-messages", {"chosen": HH_PROMPT + " Yes.", "rejected": [U, A]}, "rejected",
     "both must be text or both chat messages"),
    ("messages-identical", {"chosen": [U, A], "rejected": [U, A]}, "rejected", "identical"),
    ("messages-nothing-shared", {"chosen": [U, A], "rejected": [user("Is it sunny?"), A]}, "prompt",
     "share no leading messages"),
    ("messages-prefix", {"chosen": [U, A], "rejected": [U, A, user("Sure?"), assistant("Yes.")]}, "chosen",
     "nothing is left of it"),
    ("messages-rest-opens-with-user", {"chosen": [U, A, user("Sure?"), A], "rejected": [U, A, user("Why?"), A]},
     "chosen", "must open with an assistant message, got role 'user'"),
    ("weight-negative", {**HH[0], "weight": -0.5}, "weight", "finite number >= 0, got -0.5"),
    ("weight-string", {**HH[0], "weight": "2"}, "weight", "finite number >= 0, got '2'"),
    ("weight-bool", {**HH[0], "weight": True}, "weight", "finite number >= 0"),
    ("weight-list", {**HH[0], "weight": [1]}, "weight", "finite number >= 0"),
    ("margin-string", {**HH[0], "margin": "1"}, "margin", "finite number"),
]


@pytest.mark.parametrize("bad_row,field,fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_pair_names_file_row_and_field(tmp_path, tok, cache, bad_row, field, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [HH[0], bad_row, HH[1]])
    with pytest.raises(DataError) as err:
        load(path, tok, cache)
    message = str(err.value)
    assert str(path) in message and "row 1" in message and f"field '{field}'" in message and fragment in message
    assert err.value.row == 1 and err.value.field == field
    data = load(path, tok, cache, on_error="skip")
    assert data.num_skipped == 1 and [ex.row for ex in data.train] == [0, 2]
    assert fragment in data.skip_messages[0]


def test_non_finite_weight_is_refused():
    from prefopt.data.reward_rows import row_weight
    for bad in (math.nan, math.inf, 10 ** 400):
        with pytest.raises(DataError, match=r"row 3, field 'w': the weight must be a finite number >= 0"):
            row_weight({"w": bad}, "w", "f.jsonl", 3)
    assert row_weight({"w": 0}, "w", "f.jsonl", 3) == 0.0 and row_weight({}, "w", "f.jsonl", 3) is None


# ----------------------------------------------------------------------------- margin and weight fields

def test_margin_and_weight_reach_examples_and_batches(tmp_path, tok, cache):
    rows = [{**HH[0], "margin": 1.5, "weight": 2}, HH[1], {**HH[2], "weight": 0}, {**HH[3], "margin": -0.25}]
    data = load(write_jsonl(tmp_path / "mw.jsonl", rows), tok, cache)
    assert [ex.margin for ex in data.train] == [1.5, None, None, -0.25]
    assert [ex.weight for ex in data.train] == [2.0, None, 0.0, None]
    batch = collate_examples(data.train, pad_id=tok.pad_token_id, kind="pairs")
    assert batch["margin"].tolist() == [1.5, 0.0, 0.0, -0.25]
    assert batch["weight"].tolist() == [2.0, 1.0, 0.0, 1.0]
    plain = collate_examples(data.train[1:2], pad_id=tok.pad_token_id, kind="pairs")
    assert "margin" not in plain and "weight" not in plain


def _logps(seed, n=4, b=6):
    g = torch.Generator().manual_seed(seed)
    return [(-20.0 * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(n)]


def _neg_log_sigmoid(z):
    return math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_margin_shifts_the_logit_and_weight_scales_the_loss(eps):
    beta = 0.3
    pc, pr, rc, rr = _logps(0)
    margin = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.25, 3.0], dtype=torch.float64)
    weight = torch.tensor([1.0, 0.0, 2.5, 0.5, 1.0, 4.0], dtype=torch.float64)
    losses, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, margin=margin, weight=weight)
    for i in range(6):
        z = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())) - margin[i].item()
        expected = (1 - eps) * _neg_log_sigmoid(z) + eps * _neg_log_sigmoid(-z)
        assert losses[i].item() == pytest.approx(weight[i].item() * expected, abs=1e-9)
    # the batch loss is the mean of w_i * l_i (divided by the number of pairs, not by sum w_i)
    unweighted, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, margin=margin)
    assert losses.mean().item() == pytest.approx(sum(weight[i].item() * unweighted[i].item() for i in range(6)) / 6,
                                                 abs=1e-12)
    # ODPO with the implicit rewards is the Bradley-Terry loss with Llama 2's margin (TRL RewardTrainer's
    # -logsigmoid(r_c - r_r - margin)); the rewards do not depend on the margin
    bt = bradley_terry_loss(rew_c, rew_r, margin=margin, label_smoothing=eps)
    torch.testing.assert_close(unweighted.detach(), bt, atol=1e-12, rtol=1e-12)
    _, plain_c, plain_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert torch.equal(plain_c, rew_c) and torch.equal(plain_r, rew_r)


def test_defaults_are_bit_identical():
    pc, pr, rc, rr = _logps(1)
    base, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    same, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1, margin=torch.zeros(6), weight=torch.ones(6))
    assert torch.equal(base, same)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, ipo=True)
    assert torch.equal(ipo, dpo_loss(pc, pr, rc, rr, beta=0.1, ipo=True, weight=torch.ones(6))[0])
    simpo, _, _ = simpo_loss(pc, pr, beta=2.0, gamma=1.0)
    assert torch.equal(simpo, simpo_loss(pc, pr, beta=2.0, gamma=1.0, weight=torch.ones(6))[0])
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(simpo_loss(pc, pr, beta=2.0, gamma=1.0, weight=w)[0], w * simpo, rtol=0, atol=0)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.1, ipo=True, weight=w)[0], w * ipo, rtol=0, atol=0)


def test_ipo_and_simpo_refuse_a_margin():
    pc, pr, rc, rr = _logps(2)
    with pytest.raises(ValueError, match="IPO has no published per-pair margin"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, ipo=True, margin=torch.zeros(6))
    policy = PolicyOutput(logps=torch.cat([pc, pr]).detach(), num_tokens=torch.full((12,), 3.0, dtype=torch.float64))
    batch = {"ref_logps": torch.cat([rc, rr]).detach(), "margin": torch.ones(6)}
    for objective in (IPO(IPO.Params()), DPO(DPO.Params(ipo=True)), SimPO(SimPO.Params())):
        with pytest.raises(ConfigError, match="no per-pair margin.*data.margin_field"):
            objective.loss(policy, batch)
    DPO(DPO.Params()).loss(policy, batch)   # DPO reads it


# ----------------------------------------------------------------------------- invariance

def _random_examples(n: int, seed: int, margins: bool) -> list[Example]:
    g = random.Random(seed)
    examples = []
    for i in range(n):
        prompt = [1] + [g.randrange(3, 40) for _ in range(g.randrange(1, 5))]
        responses = [[g.randrange(3, 40) for _ in range(g.randrange(1, 7))] for _ in range(2)]
        examples.append(Example(
            prompt_ids=prompt, response_ids=responses, scores=[1.0, 0.0], row=i,
            ref_logps=[-g.uniform(1, 20), -g.uniform(1, 20)],
            margin=g.choice([None, g.uniform(-1, 2)]) if margins else None,
            weight=g.choice([None, 0.0, g.uniform(0, 3)])))
    return examples


def _loss(objective, examples, table):
    """The objective's loss on the collated micro-batch, with each row's log-prob a differentiable
    sum of per-token values of ``table`` over its response tokens (a stand-in for the policy)."""
    batch = collate_examples(examples, pad_id=0, kind="pairs")
    mask = batch["loss_mask"].to(torch.float64)
    policy = PolicyOutput(logps=(table[batch["input_ids"]] * mask).sum(-1), num_tokens=mask.sum(-1))
    return objective.loss(policy, batch).loss


@pytest.mark.parametrize("objective,margins", [(DPO(DPO.Params(beta=0.2, label_smoothing=0.1)), True),
                                               (IPO(IPO.Params(beta=0.5)), False),
                                               (SimPO(SimPO.Params()), False)], ids=["cdpo", "ipo", "simpo"])
def test_batch_of_8_equals_8_micro_batches_of_1(objective, margins):
    """The learner weights each micro-batch's loss by its share of the examples: with the weighted
    mean of w_i * l_i, one batch of 8 and 8 micro-batches of 1 give the same loss and gradient."""
    examples = _random_examples(8, seed=3, margins=margins)
    assert any(ex.weight is None for ex in examples) and any(ex.weight for ex in examples)
    table = (-torch.rand(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).requires_grad_()
    whole = _loss(objective, examples, table)
    (grad_whole,) = torch.autograd.grad(whole, table)
    parts = sum(_loss(objective, [ex], table) * (1 / len(examples)) for ex in examples)
    (grad_parts,) = torch.autograd.grad(parts, table)
    torch.testing.assert_close(whole, parts, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_whole, grad_parts, atol=1e-12, rtol=1e-12)
    # and a weight of 1 on every row is the unweighted loss, exactly
    ones = [Example(**{**ex.__dict__, "weight": 1.0}) for ex in examples]
    none = [Example(**{**ex.__dict__, "weight": None}) for ex in examples]
    assert torch.equal(_loss(objective, ones, table), _loss(objective, none, table))


def test_ipo_and_simpo_refuse_margin_rows_before_ray(tmp_path):
    """prefopt validate (the pre-flight, before Ray) names the first row that carries a margin."""
    from prefopt.config import load_recipe
    from prefopt.errors import DataError
    from prefopt.preflight import prepare
    rows = [{"prompt": f"Describe the river {i}.", "chosen": "kind clear.", "rejected": "rude vague."} for i in range(40)]
    rows[7]["margin"] = 0.5
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = [f"data.path={path}", "data.eval_fraction=0.1", "train.batch_size=4", "train.micro_batch_size=2",
              f"output.root={tmp_path / 'runs'}"]
    for recipe in ("tiny_ipo", "tiny_simpo"):
        with pytest.raises(DataError, match=r"row 7.*margin.*no per-pair margin"):
            prepare(load_recipe(f"recipes/{recipe}.yaml", common))
    prepare(load_recipe("recipes/tiny_dpo.yaml", common))     # DPO reads it (ODPO's offset)
