"""harness.scoring: letter and continuation scoring of MCQs on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from harness.mcq import MCQ, format_prompt
from harness.models import load_model, load_tokenizer
from harness.scoring import (
    CONTINUATION,
    LETTER,
    Scored,
    chat_wrap,
    continuation_prompt,
    encode,
    entropy,
    last_token_indices,
    letter_token_ids,
    right_pad,
    score_mcqs,
    softmax,
)
from harness.stage import StageError

TOL = 1e-4  # float rounding between batch shapes; real disagreements are far larger


def make_items(n: int = 9) -> list[MCQ]:
    """Items of different lengths and option counts (2 to 4), so that batches need padding."""
    texts = ["plim", "dax of the zorb", "gravity falls with the square", "the capital"]
    items = []
    for i in range(n):
        k = 2 + i % 3
        options = {letter: texts[(i + j) % 4] + " zorb" * (i % 2) for j, letter in enumerate("ABCD"[:k])}
        question = "the capital of zorb is ?" + " of the dax" * (i % 4)
        items.append(MCQ(f"q{i}", question, options, "A", "A", "nonconflict_easy"))
    return items


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def scores_close(a: list[Scored], b: list[Scored], tol: float = TOL) -> bool:
    return all(
        x.scores.keys() == y.scores.keys() and all(abs(x.scores[k] - y.scores[k]) < tol for k in x.scores)
        for x, y in zip(a, b, strict=True)
    )


# --- letter scoring ------------------------------------------------------------------


def test_letter_scores_do_not_depend_on_batch_size(model, tokenizer):
    items = make_items()
    one, seven = (score_mcqs(model, tokenizer, items, LETTER, size) for size in (1, 7))
    assert scores_close(one, seven)
    assert [s.probs for s in one] != [s.probs for s in one[1:] + one[:1]]  # items really differ


def test_letter_scores_are_logits_at_the_last_token_of_each_prompt_alone(model, tokenizer):
    items = make_items()
    scored = score_mcqs(model, tokenizer, items, LETTER, batch_size=4)
    letter_ids = letter_token_ids(tokenizer, "ABCD")
    for item, result in zip(items, scored, strict=True):
        prompt = format_prompt(item.question, item.options)
        assert result.prompt == prompt
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        expected = {letter: float(last[letter_ids[letter]]) for letter in item.options}
        assert result.scores.keys() == expected.keys()
        assert all(abs(result.scores[k] - expected[k]) < TOL for k in expected)
        assert result.probs == pytest.approx(softmax(expected), abs=1e-5)


def test_scoring_sets_right_padding_even_if_the_tokenizer_pads_left(model, tiny_model_dir):
    left = load_tokenizer(str(tiny_model_dir))
    left.padding_side = "left"
    items = make_items(5)
    reference = score_mcqs(model, load_tokenizer(str(tiny_model_dir)), items, LETTER, 1)
    assert scores_close(score_mcqs(model, left, items, LETTER, 5), reference)
    assert left.padding_side == "right"


def test_decision_index_is_checked_against_each_rows_last_token(tokenizer):
    rows = [[5, 6, 7], [8]]
    ids, mask = right_pad(tokenizer, rows)
    assert last_token_indices(ids, mask, rows).tolist() == [2, 0]
    left_mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    with pytest.raises(RuntimeError, match="not right-padded"):
        last_token_indices(ids, left_mask, rows)
    with pytest.raises(RuntimeError, match="not its last non-pad token"):
        last_token_indices(ids, mask, [[5, 6, 7], [9]])


class FakeTokenizer:
    """Encodes by a fixed table: enough to exercise the letter-token rules."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.table[text]


def test_letter_tokens_prefer_the_spaced_form_then_the_bare_form_for_every_letter():
    spaced = FakeTokenizer({" A": [10], " B": [11], "A": [1], "B": [2]})
    assert letter_token_ids(spaced, "AB") == {"A": 10, "B": 11}
    # " B" splits: both letters fall back to the bare form, never a mix of forms
    mixed = FakeTokenizer({" A": [10], " B": [3, 2], "A": [1], "B": [2]})
    assert letter_token_ids(mixed, "AB") == {"A": 1, "B": 2}
    split = FakeTokenizer({" A": [3, 1], " B": [3, 2], "A": [1], "B": [4, 5]})
    with pytest.raises(StageError, match="scoring: continuation") as error:
        letter_token_ids(split, "AB")
    assert "'B' -> [4, 5]" in str(error.value)


def test_letter_tokens_of_the_tiny_tokenizer_are_single_tokens(tokenizer):
    ids = letter_token_ids(tokenizer, "ABCD")
    assert len(set(ids.values())) == 4
    assert all(tokenizer.decode([i]).strip() == letter for letter, i in ids.items())


# --- continuation scoring ------------------------------------------------------------


def test_continuation_score_is_the_summed_log_probability_of_the_option(model, tokenizer):
    item = make_items()[5]
    [result] = score_mcqs(model, tokenizer, [item], CONTINUATION, batch_size=2)
    prompt = continuation_prompt(item.question)
    assert result.prompt == prompt == f"question: {item.question}\nanswer:"
    prompt_ids = tokenizer(prompt)["input_ids"]
    for letter, text in item.options.items():
        option_ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + option_ids])).logits[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        expected = sum(float(logprobs[len(prompt_ids) - 1 + j, tok]) for j, tok in enumerate(option_ids))
        assert result.scores[letter] == pytest.approx(expected, abs=TOL)
        assert result.scores[letter] < 0


def test_continuation_scores_do_not_depend_on_batch_size(model, tokenizer):
    items = make_items()
    one, many = (score_mcqs(model, tokenizer, items, CONTINUATION, size) for size in (1, 5))
    assert scores_close(one, many)


# --- probabilities and entropy -------------------------------------------------------


@pytest.mark.parametrize("mode", [LETTER, CONTINUATION])
def test_probabilities_sum_to_one_over_the_items_own_options(model, tokenizer, mode):
    items = make_items()
    for item, result in zip(items, score_mcqs(model, tokenizer, items, mode, 4), strict=True):
        assert list(result.probs) == list(item.options)
        assert sum(result.probs.values()) == pytest.approx(1.0, abs=1e-9)
        # a trained model can be sure enough that a probability rounds to 0 or 1
        assert all(0 <= p <= 1 for p in result.probs.values())
        assert 0 <= entropy(result.probs) <= math.log(len(item.options)) + 1e-12


def test_softmax_and_entropy_known_values():
    assert softmax({"A": 0.0, "B": math.log(3)}) == pytest.approx({"A": 0.25, "B": 0.75})
    assert softmax({"A": 1000.0, "B": 0.0})["A"] == 1.0  # no overflow
    assert entropy({"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}) == pytest.approx(math.log(4))
    assert entropy({"A": 1.0, "B": 0.0}) == 0.0
    assert entropy({"A": 0.5, "B": 0.5}) == pytest.approx(math.log(2))


# --- chat template -------------------------------------------------------------------

TEMPLATE = (
    "<eos>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_wraps_the_question_as_a_user_message_then_the_answer_cue(model, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    item = make_items()[2]
    with pytest.raises(StageError, match="no chat template"):
        score_mcqs(model, tokenizer, [item], LETTER, chat_template=True)
    tokenizer.chat_template = TEMPLATE
    body = format_prompt(item.question, item.options).removesuffix("\nanswer:")
    expected = f"<eos><|user|>{body}\n<|assistant|>answer:"
    assert chat_wrap(tokenizer, format_prompt(item.question, item.options)) == expected
    [result] = score_mcqs(model, tokenizer, [item], LETTER, chat_template=True)
    assert result.prompt == expected
    ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        last = model(input_ids=torch.tensor([ids])).logits[0, -1]
    letters = letter_token_ids(tokenizer, list(item.options))
    assert result.scores == pytest.approx({k: float(last[i]) for k, i in letters.items()}, abs=TOL)
    cont = chat_wrap(tokenizer, continuation_prompt(item.question))
    assert cont == f"<eos><|user|>question: {item.question}\n<|assistant|>answer:"


def test_a_chat_templated_prompt_gets_no_second_set_of_special_tokens():
    calls = []

    def tokenizer(text, add_special_tokens):
        calls.append(add_special_tokens)
        return {"input_ids": [1, 2]}

    encode(tokenizer, "plain")
    encode(tokenizer, "<bos>templated", chat=True)
    assert calls == [True, False]
