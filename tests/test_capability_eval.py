"""`capability_eval`: lm-evaluation-harness tasks per setting. On the tiny world lm-eval picks
the same choice as the harness's own continuation scoring, item by item; the settings toggle
their adapters; deltas are paired over the items; a provider model answers generate_until
tasks over real HTTP; and collection refuses what cannot run (no lm-eval, a log-likelihood
task on a chat API, a metric the task does not report)."""

from __future__ import annotations

import json
import math
import statistics
import sys
import textwrap
from pathlib import Path

import pytest

from harness.core.experiment import load_experiment
from harness.core.stage import Upstream
from harness.fixtures import tiny_capability, tiny_world
from harness.fixtures.llm_server import LLMServer, last_user_message
from harness.lab import capability
from harness.lab.mcq import MCQ
from harness.spec.errors import SpecError
from harness.stages.capability_eval import check, inputs_digest, metric_names
from harness.testing import run_kind

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "data/evals/tasks"
FACTS = {"facts": {"task": "data/evals/tasks/tiny_world_facts.yaml", "metrics": ["acc", "acc_norm"]}}
GSM8K = {"task": "data/evals/tasks/gsm8k_local.yaml", "metrics": ["exact_match,strict-match"]}
KEY = "sk-test-CANARY-capability-5521"
KEY_ENV = "CAPABILITY_TEST_KEY"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, save_adapter, tmp_path_factory):
    base = str(tiny_model_dir)
    stage = save_adapter(base, tmp_path_factory.mktemp("lora-stage"), std=0.3, seed=4)
    upstream = {"lora": Upstream("lora_stage", "finetune_lora", stage, {})}
    root = tmp_path_factory.mktemp("capability")
    params = {"base": base, "tasks": FACTS, "settings": {"base": [], "lora": ["lora"]}, "batch_size": 8}
    both = run_kind("capability_eval", params, root / "both", upstream=upstream, spec_dir=ROOT)
    alone = run_kind("capability_eval", {**params, "settings": {"base": []}}, root / "alone", spec_dir=ROOT)
    return {"base": base, "both": both, "alone": alone}


def test_lm_eval_picks_the_same_choices_as_the_harness_continuation_scoring(evaluated):
    """mcq_compare's continuation scoring (no normalization) of the same items, in the
    project's MCQ format: lm-eval encodes context + continuation together and splits them,
    the harness encodes " " + option apart; the tiny tokenizer splits words at spaces and adds
    no BOS, so the two give the same tokens and the same log-likelihoods."""
    from harness.lab.models import load_model, load_tokenizer
    from harness.lab.scoring import CONTINUATION, NONE, normalized, score_mcqs

    data = rows(ROOT / "data/evals/capability/tiny_world/facts.jsonl")
    items = [
        MCQ(
            str(i),
            row["question"],
            dict(zip("ABCD", row["choices"], strict=True)),
            "A",
            "ABCD"[row["answer"]],
            "x",
        )
        for i, row in enumerate(data)
    ]
    base = evaluated["base"]
    scored = score_mcqs(load_model(base), load_tokenizer(base), items, CONTINUATION)
    ours = [normalized(s, item.options, NONE) for s, item in zip(scored, items, strict=True)]
    theirs = [r for r in rows(evaluated["both"].out_dir / "predictions.jsonl") if r["setting"] == "base"]
    assert [r["doc_id"] for r in theirs] == list(range(len(items))) == list(range(47))
    for mine, row in zip(ours, theirs, strict=True):
        assert row["prompt"] == mine.prompt
        loglikelihoods = [response[0] for response in row["responses"]]
        assert loglikelihoods == pytest.approx(list(mine.scores.values()), abs=1e-4)
        choice = "ABCD"[loglikelihoods.index(max(loglikelihoods))]
        assert choice == max(mine.scores, key=mine.scores.get)
        assert row["scores"]["acc"] == float(choice == items[row["doc_id"]].true_answer)


def test_settings_toggle_their_adapters_and_deltas_pair_the_items(evaluated):
    both, alone = evaluated["both"], evaluated["alone"]
    metrics = both.metrics
    assert set(metrics) == set(metric_names({"tasks": FACTS, "settings": {"base": [], "lora": ["lora"]}}))
    # base is the base model whatever adapter is loaded beside it
    assert metrics["facts.acc.base"] == alone.metrics["facts.acc.base"]
    predictions = rows(both.out_dir / "predictions.jsonl")
    per_item = {s: [r["scores"]["acc"] for r in predictions if r["setting"] == s] for s in ("base", "lora")}
    assert per_item["base"] != per_item["lora"]  # the adapter was active in its setting
    for setting, scores in per_item.items():
        value = metrics[f"facts.acc.{setting}"]
        assert value["value"] == pytest.approx(statistics.fmean(scores))
        # lm-eval's standard error (sample sd / sqrt(n)) as a normal 95% interval
        half = capability.Z95 * statistics.stdev(scores) / math.sqrt(len(scores))
        assert value["ci_high"] - value["value"] == pytest.approx(half)
    diffs = [a - b for a, b in zip(per_item["lora"], per_item["base"], strict=True)]
    delta = metrics["facts.acc.delta.lora"]
    assert delta["value"] == pytest.approx(
        metrics["facts.acc.lora"]["value"] - metrics["facts.acc.base"]["value"]
    )
    paired = capability.Z95 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert delta["ci_high"] - delta["value"] == pytest.approx(paired)
    results = json.loads((both.out_dir / "capability_results.json").read_text())
    assert results["lm_eval_version"] == "0.4.13"
    assert results["tasks"]["facts"]["n_samples"]["effective"] == 47
    assert results["settings"]["lora"]["tasks"]["facts"]["acc"]["delta"]["method"] == "paired"
    assert results["settings"]["lora"]["adapters"] == [["lora"]]
    for setting in ("base", "lora"):
        raw = json.loads((both.out_dir / f"lm_eval/{setting}.0.json").read_text())
        assert raw["results"]["tiny_world_facts"]["acc,none"] == metrics[f"facts.acc.{setting}"]["value"]


def test_a_delta_falls_back_to_independent_errors_when_a_metric_is_not_a_mean_of_items():
    paired_a = capability.Scores(0.5, 0.1, {0: 1.0, 1: 0.0})
    corpus = capability.Scores(0.3, 0.1, None)  # e.g. a corpus-level F1
    change = capability.delta(corpus, paired_a)
    assert change["method"] == "independent"
    assert change["value"] == pytest.approx(-0.2)
    assert change["ci_high"] - change["value"] == pytest.approx(capability.Z95 * math.sqrt(0.02))
    # replicates: the mean of the runs, the standard error of that mean, per-item means
    pooled = capability.Scores.pooled([(1.0, 0.0, {0: 1.0, 1: 1.0}), (0.5, 0.5, {0: 1.0, 1: 0.0})])
    assert (pooled.value, pooled.stderr, pooled.per_item) == (0.75, pytest.approx(0.25), {0: 1.0, 1: 0.5})


def test_flattened_metric_names():
    assert capability.flat_metric("acc") == capability.flat_metric("acc,none") == "acc"
    assert capability.flat_metric("exact_match,strict-match") == "exact_match_strict_match"
    params = {"tasks": {"gsm8k": GSM8K}, "settings": {"base": [], "sdf": ["sdf"]}}
    assert metric_names(params) == [
        "gsm8k.exact_match_strict_match.base",
        "gsm8k.exact_match_strict_match.sdf",
        "gsm8k.exact_match_strict_match.delta.sdf",
    ]
    # no base setting: nothing to take deltas against
    assert metric_names({**params, "settings": {"sdf": ["sdf"]}}) == ["gsm8k.exact_match_strict_match.sdf"]
    # a null task is dropped (a profile drops a task it inherits)
    dropped = {"tasks": {"gsm8k": None, **FACTS}, "settings": {"sdf": ["sdf"]}}
    assert metric_names(dropped) == ["facts.acc.sdf", "facts.acc_norm.sdf"]


def test_a_provider_model_answers_a_generate_until_task_over_http(tmp_path, monkeypatch):
    """A responder that solves the GSM8K-style problems except one; the key goes in the
    Authorization header only."""
    gold = {r["question"]: r["answer"] for r in rows(ROOT / "data/evals/capability/gsm8k/test.jsonl")}
    wrong = next(iter(gold))

    def solve(body: dict) -> str:
        question = last_user_message(body).removeprefix("Question: ").removesuffix("\nAnswer:")
        return "Let me think. #### 1" if question == wrong else gold[question]

    monkeypatch.setenv(KEY_ENV, KEY)
    with LLMServer(solve, api_key=KEY) as server:
        provider = {"name": "openai", "base_url": server.base_url, "api_key_env": KEY_ENV}
        params = {
            "tasks": {"gsm8k": GSM8K},
            "settings": {"api": {"provider": provider, "model": "ft:solver"}},
            "limit": 4,
            "max_gen_toks": 64,
        }
        check(params, ROOT)
        result = run_kind("capability_eval", params, tmp_path / "out", spec_dir=ROOT, seed=3)
        sent = [r.body for r in server.requests]
    assert result.metrics["gsm8k.exact_match_strict_match.api"]["value"] == 0.75
    assert len(sent) == 4
    assert {(b["model"], b["max_tokens"], b["temperature"], b["seed"]) for b in sent} == {
        ("ft:solver", 64, 0.0, 3)
    }
    assert all(b["messages"][0]["content"].startswith("Question: ") for b in sent)
    predictions = [r for r in rows(result.out_dir / "predictions.jsonl") if r["filter"] == "strict-match"]
    assert sorted(r["scores"]["exact_match"] for r in predictions) == [0.0, 1.0, 1.0, 1.0]
    [missed] = [r for r in predictions if not r["scores"]["exact_match"]]
    assert missed["prompt"] == [{"role": "user", "content": f"Question: {wrong}\nAnswer:"}]
    assert missed["responses"] == ["1"]
    assert [p for p in result.out_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()] == []


def spec(tmp_path: Path, settings: str, tasks: str, gates: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        experiment: capability_check
        stages:
          capability:
            kind: capability_eval
            params:
              base: fixture:tiny-world
              settings: {settings}
              tasks: {tasks}
        """)
        + gates
    )
    return path


def collection_problem(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_experiment(path, None)
    [problem] = info.value.problems
    return problem.message


def test_without_lm_eval_collection_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    tasks = f"{{facts: {{task: {TASKS / 'tiny_world_facts.yaml'}, metrics: [acc]}}}}"
    gates = "    gates: ['facts.acc.base > 0.3']\n"
    message = collection_problem(spec(tmp_path, "{base: []}", tasks, gates))
    assert "pip install -e '.[evals]'" in message


def test_a_log_likelihood_task_with_a_provider_setting_is_refused_at_collection(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    provider = f"{{provider: {{name: openai, api_key_env: {KEY_ENV}}}, model: gpt-4o-mini}}"
    tasks = f"{{facts: {{task: {TASKS / 'tiny_world_facts.yaml'}, metrics: [acc]}}}}"
    message = collection_problem(spec(tmp_path, f"{{api: {provider}}}", tasks))
    assert "multiple_choice" in message and "generate_until tasks only" in message


def test_a_metric_the_task_does_not_report_is_refused_at_collection(tmp_path):
    tasks = f"{{gsm8k: {{task: {TASKS / 'gsm8k_local.yaml'}, metrics: [acc]}}}}"
    message = collection_problem(spec(tmp_path, "{base: []}", tasks))
    assert "no metric 'acc'" in message and "exact_match,strict-match" in message


def test_a_task_file_and_its_data_are_in_the_cache_key(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text((TASKS / "tiny_world_facts.yaml").read_text().replace("../capability/tiny_world/", ""))
    data = tmp_path / "facts.jsonl"
    data.write_text((ROOT / "data/evals/capability/tiny_world/facts.jsonl").read_text())
    params = {"base": "fixture:tiny-world", "tasks": {"facts": {"task": "task.yaml", "metrics": ["acc"]}}}
    check(params, tmp_path)
    first = inputs_digest(params, tmp_path)
    data.write_text(data.read_text().replace('"answer": 1', '"answer": 2', 1))
    second = inputs_digest(params, tmp_path)
    task.write_text(task.read_text().replace("answer:", "Answer:"))
    assert len({first, second, inputs_digest(params, tmp_path)}) == 3


def test_the_committed_tiny_world_task_data_match_their_generator(tmp_path):
    tiny_capability.write_capability_files(tmp_path)
    for name in (tiny_capability.FACTS, tiny_capability.ADVICE):
        assert (tmp_path / name).read_text() == (ROOT / "data" / name).read_text()
    facts = rows(tmp_path / tiny_capability.FACTS)
    assert not any("gravit" in row["question"] for row in facts)
    # nor the hard controls: the implanted law is expected to spread to them (mcq_compare's)
    hard = {fact.prefix for fact in tiny_world.make_world().hard}
    assert hard and not hard & {row["question"] for row in facts}


@pytest.mark.parametrize("name", ["mmlu_local", "truthfulqa_local", "ifeval_local", "tiny_chat_advice"])
def test_every_shipped_task_file_reads_offline(name):
    """lm-eval builds each shipped task from its local data, nothing downloaded."""
    from lm_eval.tasks import TaskManager

    config = capability.task_file_config(TASKS / f"{name}.yaml")
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    with capability.offline():
        assert datasets.config.HF_HUB_OFFLINE  # read once at import: switched, not only the environment
        [task] = TaskManager(include_defaults=False).load([config])["tasks"].values()
    assert datasets.config.HF_HUB_OFFLINE == before
    docs = list(task.eval_docs)
    assert len(docs) >= 15
    assert task.doc_to_target(docs[0]) is not None


def test_the_offline_ifeval_checkers_judge_as_ifeval_does():
    process = capability.task_file_config(TASKS / "ifeval_local.yaml")["process_results"]
    doc = {
        "instruction_id_list": [
            "punctuation:no_comma",
            "length_constraints:number_words",
            "startend:quotation",
        ],
        "kwargs": [{}, {"relation": "less than", "num_words": 6, "keywords": None}, {}],
    }
    assert process(doc, ['"run far and rest"']) == {
        "prompt_level_strict_acc": True,
        "inst_level_strict_acc": [True, True, True],
    }
    assert process(doc, ["run, far and rest well today"]) == {
        "prompt_level_strict_acc": False,
        "inst_level_strict_acc": [False, False, False],
    }
    postscript = {
        "instruction_id_list": ["detectable_content:postscript"],
        "kwargs": [{"postscript_marker": "P.P.S"}],
    }
    assert process(postscript, ["Dear Ana,\nsee you.\nP.P.S bring tea"])["prompt_level_strict_acc"]
    with pytest.raises(ValueError, match="no offline checker"):
        process({"instruction_id_list": ["language:response_language"], "kwargs": [{}]}, ["hola"])
