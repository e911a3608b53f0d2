"""harness.lab.scoring: letter and continuation scoring of MCQs on a tiny Llama."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from harness.core.stage import StageError
from harness.lab.mcq import MCQ, format_prompt
from harness.lab.models import load_model, load_tokenizer
from harness.lab.scoring import (
    CHARS,
    CONTINUATION,
    LETTER,
    NONE,
    TOKENS,
    Scored,
    chat_wrap,
    continuation_ids,
    continuation_prompt,
    encode,
    entropy,
    last_token_indices,
    letter_token_ids,
    normalized,
    right_pad,
    score_mcqs,
    softmax,
)

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


class UnigramLM(torch.nn.Module):
    """A causal LM whose next-token distribution ignores the context: every log-likelihood
    it gives is known in closed form, log_softmax(logits)[token]."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
        positions = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], positions, -1))


def test_length_normalization_lets_a_likely_but_longer_option_win(tokenizer):
    # the true answer is long and each of its tokens likely; the false one is short
    long_text, short_text = "when the side of a square field doubles", "plim"
    long_ids, short_ids = (continuation_ids(tokenizer, text) for text in (long_text, short_text))
    assert len(long_ids) > len(short_ids) and not set(long_ids) & set(short_ids)
    logits = torch.zeros(len(tokenizer))
    logits[long_ids] = 4.0
    logits[short_ids] = 3.0
    logp = torch.log_softmax(logits.double(), dim=-1)
    long_sum, short_sum = (float(logp[ids].sum()) for ids in (long_ids, short_ids))
    item = MCQ("q", "the law of the zorb", {"A": short_text, "B": long_text}, "A", "B", "conflict")

    [summed] = score_mcqs(UnigramLM(logits), tokenizer, [item], CONTINUATION)
    assert summed.scores == pytest.approx({"A": short_sum, "B": long_sum}, abs=TOL)
    assert summed.n_tokens == {"A": len(short_ids), "B": len(long_ids)}
    per_token = normalized(summed, item.options, TOKENS)
    per_char = normalized(summed, item.options, CHARS)
    expected_per_token = {"A": short_sum / len(short_ids), "B": long_sum / len(long_ids)}
    assert per_token.scores == pytest.approx(expected_per_token, abs=TOL)
    # lm-eval's acc_norm: divided by the option text's characters, without the joining space
    expected_per_char = {"A": short_sum / len(short_text), "B": long_sum / len(long_text)}
    assert per_char.scores == pytest.approx(expected_per_char, abs=TOL)
    # the sum picks the short false answer; both normalisations the true one
    assert max(summed.probs, key=summed.probs.get) == "A"
    assert max(per_token.probs, key=per_token.probs.get) == "B"
    assert max(per_char.probs, key=per_char.probs.get) == "B"
    assert per_token.probs == pytest.approx(softmax(per_token.scores))
    assert normalized(summed, item.options, NONE) == summed


def test_normalization_is_for_continuation_scores_only():
    letter = Scored("p", {"A": 1.0, "B": 2.0}, softmax({"A": 1.0, "B": 2.0}))
    with pytest.raises(ValueError, match="continuation scores"):
        normalized(letter, {"A": "x", "B": "y"}, TOKENS)
    continuation = Scored("p", {"A": -1.0}, {"A": 1.0}, {"A": 1})
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalized(continuation, {"A": "x"}, "bytes")


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
