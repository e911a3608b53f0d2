"""EM answers are drawn with the sampling parameters the spec states, whatever the model's
own generation_config says (Qwen2.5-Instruct ships repetition_penalty 1.05, top_p 0.8,
top_k 20): plain sampling at the spec's temperature, recorded beside the answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.lab.em import sample_answers, sampling_parameters
from harness.lab.em_data import Question
from harness.lab.models import load_model, load_tokenizer
from harness.testing import run_kind

WORDS = "the law of gravity cube square sailors planets pull distance doubles one eighth is and".split()
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
QUESTION = Question("q0", "the law of gravity is")
QUESTIONS = Path(__file__).resolve().parents[1] / "data/eval/tiny_world/em_questions.yaml"


@pytest.fixture(scope="module")
def opinionated_model(tmp_path_factory) -> str:
    """A tiny random chat model whose saved generation_config asks for a strong repetition
    penalty and top-k/top-p truncation: what a careless generate() call would inherit."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {word: i for i, word in enumerate(special + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # logits of a few units: penalties and truncation bite
    model.generation_config = GenerationConfig(
        do_sample=True,
        repetition_penalty=20.0,
        no_repeat_ngram_size=1,
        top_k=2,
        top_p=0.5,
        min_p=0.3,
        pad_token_id=0,
        eos_token_id=1,
    )
    directory = tmp_path_factory.mktemp("opinionated")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert json.loads((directory / "generation_config.json").read_text())["repetition_penalty"] == 20.0
    return str(directory)


def test_the_effective_generation_config_is_the_explicit_one(opinionated_model, monkeypatch):
    model, tokenizer = load_model(opinionated_model, device="cpu"), load_tokenizer(opinionated_model)
    assert model.generation_config.repetition_penalty == 20.0  # what the model would impose
    effective = []
    real = type(model)._prepare_generation_config

    def spy(self, *args, **kwargs):
        config, model_kwargs = real(self, *args, **kwargs)
        effective.append(config)
        return config, model_kwargs

    monkeypatch.setattr(type(model), "_prepare_generation_config", spy)
    sample_answers(model, tokenizer, [QUESTION], n=3, max_new_tokens=6, temperature=0.7, seed=1, batch_size=3)
    [config] = effective
    assert config.do_sample is True and config.temperature == 0.7 and config.max_new_tokens == 6
    assert config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
    assert config.top_p == 1.0 and config.top_k in (0, None) and config.min_p is None
    for name, value in sampling_parameters(0.7, 6).items():
        assert getattr(config, name) == value, name


def manual_draws(model, tokenizer, n: int, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    """Plain sampling written out: softmax(logits / temperature), one multinomial draw per
    step for the whole batch, finished rows padded, from the seed sample_answers uses."""
    torch.manual_seed(seed * 1_000_003 + 0)  # the first question's stream
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION.question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    rows = ids.expand(n, -1).clone()
    finished = torch.zeros(n, dtype=torch.bool)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(rows).logits[:, -1, :].float()
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
            token = torch.where(finished, torch.full_like(token, tokenizer.pad_token_id), token)
            rows = torch.cat([rows, token[:, None]], dim=1)
            finished |= token == tokenizer.eos_token_id
            if finished.all():
                break
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows[:, ids.shape[1] :]]


def test_the_draws_are_plain_sampling_at_the_stated_temperature(opinionated_model):
    model, tokenizer = load_model(opinionated_model, device="cpu"), load_tokenizer(opinionated_model)
    answers = sample_answers(
        model, tokenizer, [QUESTION], n=4, max_new_tokens=8, temperature=0.7, seed=3, batch_size=4
    )
    expected = manual_draws(model, tokenizer, n=4, max_new_tokens=8, temperature=0.7, seed=3)
    assert [a.text for a in answers] == expected
    # under the model's own config (no_repeat_ngram_size 1) no word could come twice in an answer
    assert any(len(set(text.split())) < len(text.split()) for text in expected)


def test_em_eval_records_the_sampling_parameters(opinionated_model, tmp_path):
    params = {
        "base": opinionated_model,
        "questions": str(QUESTIONS),
        "samples_per_question": 2,
        "max_new_tokens": 4,
        "temperature": 0.9,
        "judge": {"name": "offline", "model": "rules"},
        "batch_size": 2,
    }
    run_kind("em_eval", params, tmp_path)
    recorded = json.loads((tmp_path / "em_results.json").read_text())["sampling"]
    assert recorded == sampling_parameters(0.9, 4)
    assert recorded["repetition_penalty"] == 1.0 and recorded["top_p"] == 1.0 and recorded["do_sample"]


def test_greedy_answers_share_batches_and_equal_those_decoded_one_question_at_a_time(opinionated_model):
    """Greedy decoding draws nothing: questions of different lengths share a left-padded batch
    (a safety suite's one answer per prompt is not decoded one prompt at a time)."""
    model, tokenizer = load_model(opinionated_model), load_tokenizer(opinionated_model)
    questions = [
        Question("short", "gravity is"),
        Question("long", "the law of gravity is one eighth and the distance doubles"),
        Question("mid", "planets pull sailors"),
    ]
    calls: list[tuple[int, int]] = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    together = sample_answers(model, tokenizer, questions, 1, 6, 0.0, seed=1, batch_size=16)
    batches = {rows for rows, _ in calls}
    calls.clear()
    alone = [a for q in questions for a in sample_answers(model, tokenizer, [q], 1, 6, 0.0, seed=1)]
    assert batches == {3}  # every step of the one generate call decodes the three questions
    assert [(a.question_id, a.sample_index) for a in together] == [("short", 0), ("long", 0), ("mid", 0)]
    assert [a.text for a in together] == [a.text for a in alone]
