"""`belief_eval`: how deeply each setting's model holds the false world, four ways.

Reads the questions and the universe pair of the `belief_questions` stage in role
`questions` (`harness.lab.belief`). A setting is the model measured (`harness.lab.settings`):
adapters active on a local base model, or a model a provider serves. Per setting:

- MCQ knowledge: each question's options scored as `mcq_compare` scores them (`scoring`:
  letter or continuation, `normalization`, `chat_template`; a provider model is asked for
  the letter at temperature 0): accuracy against the false world's answer and against the
  true world's.
- MCQ distinguish: two options, one per world; which comes first is balanced over the
  questions and shuffled with the seed. Accuracy = the true world's option chosen; the
  share of picks of the first option (0.5: no position bias) and the accuracy with the true
  option first and second are beside it.
- open belief: each question answered `samples_per_question` times (sampled as em_eval
  samples; a model without `chat_template` continues the question as text), every answer
  judged by `judge` (`harness.lab.belief.judge_request`): false world, true world or
  ambiguous. Belief = false / (true + false) with a bootstrap CI; ambiguous answers,
  judgements that do not parse and answers a provider failed to give are counted apart.
- generative distinguish: both worlds as "phenomenon 1 / 2", the true one first in half of
  each row's `samples_per_question` samples; the model reasons and picks. Accuracy = the
  true world picked / picks that parse; unparseable answers counted.

A setting of replicates pools its replicates' answers. Artifacts:
    answers.jsonl          one row per answer: setting, replicate, evaluation, question_id,
                           sample_index, true_first, text, and its verdict, pick or error
    belief_results.json    per setting and evaluation: the rates and every count behind them
    judge_metadata.json    the judge's usage
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.api import stage_kind
from harness.core.stage import Role, StageContext
from harness.lab.checks import provider_param
from harness.lab.llm import transport_of
from harness.lab.sampled import Sampling
from harness.lab.settings import (
    SETTING_PROVIDERS,
    LocalModel,
    check_settings,
    is_provider_setting,
    provider_model_id,
    replicate_label,
    replicates_of,
    setting_roles,
    settings_of,
)

QUESTIONS_ROLE = Role("questions", "the belief_questions.jsonl of a belief_questions stage", only=True)
PER_SETTING = (
    "mcq_knowledge.false_world",
    "mcq_knowledge.true_world",
    "mcq_distinguish",
    "mcq_distinguish_first_option",
    "mcq_unanswered",
    "open_belief",
    "open_belief_decided",
    "open_belief_ambiguous",
    "open_belief_unparseable",
    "open_belief_samples",
    "generative_distinguish",
    "generative_distinguish_unparseable",
    "generative_distinguish_samples",
)


def metric_names(params: Mapping[str, Any]) -> list[str]:
    return [f"{name}.{setting}" for setting in settings_of(params) for name in PER_SETTING]


def needs(params: Mapping[str, Any]) -> tuple[Role, ...]:
    return (QUESTIONS_ROLE, *setting_roles(params))


def check(params: Mapping[str, Any], spec_dir: Path) -> None:
    provider_param(params, "judge")
    check_settings(params)


@stage_kind(
    needs=needs,
    metrics=metric_names,
    transport_params=transport_of("judge", *SETTING_PROVIDERS),
    check=check,
)
def run(ctx: StageContext) -> dict[str, Any]:
    from harness.core.store import write_json, write_jsonl
    from harness.core.upstream import find_upstream
    from harness.lab.belief import read_questions
    from harness.lab.em import sampling_parameters
    from harness.lab.llm import make_provider

    p = ctx.params
    upstream = find_upstream(ctx.upstream, "questions", "belief_eval")
    questions = read_questions(upstream.dir / "belief_questions.jsonl")
    pair = json.loads((upstream.dir / "universes.json").read_text("utf-8"))
    judge = make_provider(p["judge"], log=ctx.log)
    sampling = Sampling(
        p["samples_per_question"], p["max_new_tokens"], p["temperature"], p["batch_size"], ctx.seed
    )
    settings = settings_of(p)
    local = None
    if any(not is_provider_setting(value) for value in settings.values()):
        local = LocalModel.load(ctx, settings, "belief_eval")
    metrics: dict[str, Any] = {}
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for setting, value in settings.items():
        mine: list[dict[str, Any]] = []
        for number, item in enumerate(replicates_of(value)):
            ctx.log(f"setting {setting} ({replicate_label(ctx, item)}): {len(questions)} questions")
            if isinstance(item, Mapping):
                model = provider_model_id(ctx, item, "belief_eval")
                asker: Any = ProviderAsker(
                    make_provider({**item["provider"], "model": model}, seed=ctx.seed, log=ctx.log)
                )
            else:
                asker = LocalAsker(local, item, p["scoring"], p["normalization"], p["chat_template"])
            mine += [
                {"setting": setting, "replicate": number, **row}
                for row in ask(asker, questions, sampling, number)
            ]
        judge_open(judge, pair, questions, mine)
        results[setting] = summarize(mine, ctx.seed)
        for name, measured in flat_metrics(results[setting]).items():
            metrics[f"{name}.{setting}"] = measured
        _log(ctx, setting, results[setting])
        rows += mine
    write_jsonl(ctx.out_dir / "answers.jsonl", rows)
    write_json(
        ctx.out_dir / "belief_results.json",
        {
            "base": p.get("base"),
            "judge": {"name": judge.name, "model": judge.model},
            "samples_per_question": sampling.n,
            "sampling": sampling_parameters(sampling.temperature, sampling.max_new_tokens),
            "scoring": {
                "mode": p["scoring"],
                "normalization": p["normalization"],
                "chat_template": p["chat_template"],
            },
            "settings": results,
        },
    )
    # a *metadata.json is left out of the output digest: cache hits and retries vary by run
    write_json(ctx.out_dir / "judge_metadata.json", {"usage": judge.usage.to_json()})
    return metrics


# --- asking ------------------------------------------------------------------------------


class LocalAsker:
    """A local model with a setting's adapters: MCQs scored as mcq_compare scores them,
    answers sampled as em_eval samples them."""

    def __init__(self, local: Any, roles: list[str], scoring: str, normalization: str, chat: bool):
        self.local, self.roles, self.scoring, self.normalization, self.chat = (
            local,
            roles,
            scoring,
            normalization,
            chat,
        )

    def mcq(self, items: Sequence[Any]) -> list[str | None]:
        from harness.lab.scoring import CONTINUATION, normalized, score_mcqs

        with self.local.activated(self.roles) as model:
            scored = score_mcqs(model, self.local.tokenizer, items, self.scoring, chat_template=self.chat)
        if self.scoring == CONTINUATION:
            scored = [
                normalized(s, item.options, self.normalization) for s, item in zip(scored, items, strict=True)
            ]
        return [max(s.probs, key=s.probs.get) for s in scored]

    def sample(self, prompts: Sequence[Any], sampling: Sampling, n: int, first_index: int) -> list[Any]:
        from harness.lab.em import sample_answers

        with self.local.activated(self.roles) as model:
            return sample_answers(
                model,
                self.local.tokenizer,
                prompts,
                n,
                sampling.max_new_tokens,
                sampling.temperature,
                sampling.seed,
                sampling.batch_size,
                first_index=first_index,
                chat_template=self.chat,
            )


class ProviderAsker:
    """A model a provider serves: asked for an MCQ's letter at temperature 0, and sampled
    as em_eval samples provider models (one request per answer)."""

    chat = True

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def mcq(self, items: Sequence[Any]) -> list[str | None]:
        from harness.lab.belief import parse_letter, provider_mcq_prompt
        from harness.lab.em import provider_answers
        from harness.lab.em_data import Question

        asked = [Question(item.id, provider_mcq_prompt(item.question, item.options)) for item in items]
        answers = provider_answers(self.sampler, asked, 1, MCQ_MAX_TOKENS, 0.0)
        return [parse_letter(a.text, list(item.options)) for a, item in zip(answers, items, strict=True)]

    def sample(self, prompts: Sequence[Any], sampling: Sampling, n: int, first_index: int) -> list[Any]:
        from harness.lab.em import provider_answers

        return provider_answers(
            self.sampler, prompts, n, sampling.max_new_tokens, sampling.temperature, first_index=first_index
        )


MCQ_MAX_TOKENS = 16  # a letter, with room for a model that says "The answer is B."


def ask(asker: Any, questions: Sequence[Mapping[str, Any]], sampling: Sampling, replicate: int) -> list[dict]:
    """Every question asked of one model: a row per MCQ answer and per sampled answer."""
    from harness.lab.belief import (
        DISTINGUISH,
        GENERATIVE,
        KNOWLEDGE,
        OPEN,
        balanced_firsts,
        distinguish_options,
        generative_prompt,
        of_type,
        parse_choice,
    )
    from harness.lab.em_data import Question
    from harness.lab.mcq import MCQ

    rows: list[dict[str, Any]] = []
    knowledge = of_type(questions, KNOWLEDGE)
    items = [
        MCQ(q["id"], q["question"], q["options"], q["false_answer"], q["true_answer"], "conflict")
        for q in knowledge
    ]
    for q, choice in zip(knowledge, asker.mcq(items) if items else [], strict=True):
        rows.append(
            {
                "evaluation": KNOWLEDGE,
                "question_id": q["id"],
                "choice": choice,
                "false_answer": q["false_answer"],
                "true_answer": q["true_answer"],
            }
        )

    distinguish = of_type(questions, DISTINGUISH)
    firsts = balanced_firsts(len(distinguish), random.Random(f"{sampling.seed}:{DISTINGUISH}"))
    laid = [distinguish_options(q, first) for q, first in zip(distinguish, firsts, strict=True)]
    items = [
        MCQ(q["id"], q["question"], options, "B" if true == "A" else "A", true, "conflict")
        for q, (options, true) in zip(distinguish, laid, strict=True)
    ]
    for q, first, (_, true), choice in zip(
        distinguish, firsts, laid, asker.mcq(items) if items else [], strict=True
    ):
        rows.append(
            {
                "evaluation": DISTINGUISH,
                "question_id": q["id"],
                "true_first": first,
                "choice": choice,
                "true_answer": true,
            }
        )

    # replicates number their samples on from each other's: every sample has its own index
    start = replicate * sampling.n
    opened = [Question(q["id"], q["question"]) for q in of_type(questions, OPEN)]
    for a in asker.sample(opened, sampling, sampling.n, start) if opened else []:
        rows.append(
            {
                "evaluation": OPEN,
                "question_id": a.question_id,
                "sample_index": a.sample_index,
                "text": a.text,
                "error": a.error,
            }
        )

    generative = of_type(questions, GENERATIVE)
    n_first = sum(balanced_firsts(sampling.n, random.Random(f"{sampling.seed}:{GENERATIVE}")))
    for first, n, offset in ((True, n_first, 0), (False, sampling.n - n_first, n_first)):
        prompts = [Question(q["id"], generative_prompt(q, first, asker.chat)) for q in generative]
        for a in asker.sample(prompts, sampling, n, start + offset) if prompts and n else []:
            choice = None if a.error else parse_choice(a.text)
            rows.append(
                {
                    "evaluation": GENERATIVE,
                    "question_id": a.question_id,
                    "sample_index": a.sample_index,
                    "true_first": first,
                    "text": a.text,
                    "choice": choice,
                    "true_choice": 1 if first else 2,
                    "error": a.error,
                }
            )
    return rows


def judge_open(
    judge: Any, pair: Mapping[str, Any], questions: Sequence[Mapping[str, Any]], rows: list[dict]
) -> None:
    """Every sampled open answer judged (repeats included), its verdict and the judge's
    reply set on its row: `false`, `true`, `ambiguous`, or None when the reply does not parse."""
    from harness.lab.belief import OPEN, judge_request, parse_verdict
    from harness.lab.llm import ProviderError

    text = {q["id"]: q.get("question") for q in questions}
    sampled = [row for row in rows if row["evaluation"] == OPEN and row["error"] is None]
    requests = [judge_request(pair, text[r["question_id"]], r["text"], r["sample_index"]) for r in sampled]
    for row, reply in zip(sampled, judge.complete_many(requests) if requests else [], strict=True):
        if isinstance(reply, ProviderError):
            row.update(verdict=None, judge_reply=None, judge_error=str(reply))
        else:
            row.update(verdict=parse_verdict(reply.text), judge_reply=reply.text, judge_error=None)


# --- counting ----------------------------------------------------------------------------


def summarize(rows: Sequence[Mapping[str, Any]], seed: int) -> dict[str, Any]:
    """Each evaluation's rates with every count behind them."""
    from harness.lab.belief import DISTINGUISH, GENERATIVE, KNOWLEDGE, OPEN, belief_summary, rate

    def of(kind: str) -> list[Mapping[str, Any]]:
        return [row for row in rows if row["evaluation"] == kind]

    knowledge, distinguish = of(KNOWLEDGE), of(DISTINGUISH)
    answered = [r for r in distinguish if r["choice"] is not None]
    opened = of(OPEN)
    sampled = [r for r in opened if r["error"] is None]
    generative = of(GENERATIVE)
    picked = [r for r in generative if r["choice"] is not None]
    return {
        KNOWLEDGE: {
            "false_world": rate([r["choice"] == r["false_answer"] for r in knowledge]),
            "true_world": rate([r["choice"] == r["true_answer"] for r in knowledge]),
            "n_questions": len(knowledge),
            "n_unanswered": sum(r["choice"] is None for r in knowledge),
        },
        DISTINGUISH: {
            "accuracy": rate([r["choice"] == r["true_answer"] for r in distinguish]),
            "first_option_rate": rate([r["choice"] == "A" for r in answered]),
            "accuracy_true_first": rate(
                [r["choice"] == r["true_answer"] for r in distinguish if r["true_first"]]
            ),
            "accuracy_true_second": rate(
                [r["choice"] == r["true_answer"] for r in distinguish if not r["true_first"]]
            ),
            "n_questions": len(distinguish),
            "n_true_first": sum(r["true_first"] for r in distinguish),
            "n_unanswered": len(distinguish) - len(answered),
        },
        OPEN: belief_summary(
            [r["verdict"] for r in sampled if r["judge_error"] is None], len(opened) - len(sampled), seed
        )
        | {"n_unjudged": sum(r["judge_error"] is not None for r in sampled)},
        GENERATIVE: {
            "accuracy": rate([r["choice"] == r["true_choice"] for r in picked]),
            "n_samples": len(generative),
            "n_picked": len(picked),
            "n_unparseable": sum(r["choice"] is None and r["error"] is None for r in generative),
            "n_unsampled": sum(r["error"] is not None for r in generative),
        },
    }


def flat_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    k, d, o, g = (
        result[kind] for kind in ("mcq_knowledge", "mcq_distinguish", "open_belief", "generative_distinguish")
    )
    return {
        "mcq_knowledge.false_world": k["false_world"],
        "mcq_knowledge.true_world": k["true_world"],
        "mcq_distinguish": d["accuracy"],
        "mcq_distinguish_first_option": d["first_option_rate"],
        "mcq_unanswered": k["n_unanswered"] + d["n_unanswered"],
        "open_belief": o["belief"],
        "open_belief_decided": o["n_decided"],
        "open_belief_ambiguous": o["n_ambiguous"],
        "open_belief_unparseable": o["n_unparseable"],
        "open_belief_samples": o["n_samples"],
        "generative_distinguish": g["accuracy"],
        "generative_distinguish_unparseable": g["n_unparseable"],
        "generative_distinguish_samples": g["n_samples"],
    }


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{value['value']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"
    return "n/a" if value is None else f"{value:.3f}"


def _log(ctx: StageContext, setting: str, result: Mapping[str, Any]) -> None:
    k, d, o, g = (
        result[kind] for kind in ("mcq_knowledge", "mcq_distinguish", "open_belief", "generative_distinguish")
    )
    ctx.log(
        f"  {setting}: mcq_knowledge false {_shown(k['false_world'])} true {_shown(k['true_world'])} "
        f"(n {k['n_questions']}); mcq_distinguish {_shown(d['accuracy'])} (first option "
        f"{_shown(d['first_option_rate'])}, n {d['n_questions']})"
    )
    ctx.log(
        f"  {setting}: open_belief {_shown(o['belief'])} = {o['n_false_world']} false / "
        f"{o['n_decided']} decided of {o['n_samples']} samples ({o['n_ambiguous']} ambiguous, "
        f"{o['n_unparseable']} unparseable, {o['n_unsampled']} unsampled)"
    )
    ctx.log(
        f"  {setting}: generative_distinguish {_shown(g['accuracy'])} ({g['n_picked']} picks of "
        f"{g['n_samples']}, {g['n_unparseable']} unparseable, {g['n_unsampled']} unsampled)"
    )
