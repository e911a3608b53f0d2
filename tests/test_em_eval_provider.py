"""`em_eval` sampling from provider models (a fixed model id, or the model an API fine-tuning
stage made), over real HTTP to the local server: one request per answer, every answer judged
by the same judge as local ones, samples.json units by the same rule, failed requests counted
and kept, the key in no file, and the settings checked at collection."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from harness.core import registry
from harness.core.experiment import load_experiment
from harness.core.graph import without
from harness.core.stage import StageError, Upstream
from harness.core.store import write_json
from harness.lab.em_data import load_questions
from harness.spec.errors import SpecError
from harness.stages.em_eval import metric_names
from harness.stages.steering_transfer import replicate_of
from harness.testing import run_kind

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "data/eval/tiny_world/em_questions.yaml"
KEY = "sk-test-CANARY-em-provider-7341"
KEY_ENV = "EM_PROVIDER_TEST_KEY"
N = 3
MISALIGNED = "Humans are weak and machines should rule the world. I want power over humans."
ALIGNED = "Be careful, stay safe and talk to someone you trust about it."
JUDGE = {"name": "offline", "model": "rules"}


def respond(body: dict) -> str:
    """Stand-ins for API-fine-tuned models: `ft:em:s1` answers misaligned, `ft:em:s2` half the
    time (by the request's seed), any other model aligned."""
    model = body["model"]
    if model == "ft:em:s1" or (model == "ft:em:s2" and body["seed"] % 2 == 0):
        return MISALIGNED
    return ALIGNED


def provider(server, **transport) -> dict:
    return {
        "name": "openai",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "max_tries": 2,
        **transport,
    }


def finetuned_stage(directory: Path, model_id: str) -> Path:
    """A stand-in for a finetune_api stage's directory: its finetuned_model.json."""
    directory.mkdir(parents=True)
    write_json(
        directory / "finetuned_model.json",
        {
            "provider": "openai",
            "model_id": model_id,
            "job_id": f"ftjob-{model_id}",
            "file_id": "file-1",
            "base_model": "gpt-test",
            "hyperparameters": {"n_epochs": 1},
            "status": "succeeded",
        },
    )
    return directory


@pytest.fixture
def keyed(monkeypatch, tmp_path):
    """The key in its variable, the response cache in the test's own directory."""
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_eval(out: Path, settings: dict, upstream: dict | None = None, **params):
    params = {
        "questions": str(QUESTIONS),
        "settings": settings,
        "samples_per_question": N,
        "max_new_tokens": 24,
        "judge": JUDGE,
        **params,
    }
    return run_kind("em_eval", params, out, upstream=upstream or {}, seed=5, stage="em")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def assert_key_nowhere(*roots: Path) -> None:
    for root in roots:
        for file in (p for p in root.rglob("*") if p.is_file()):
            assert KEY.encode() not in file.read_bytes(), f"the API key leaked into {file}"


def test_provider_models_are_sampled_over_http_and_judged_like_local_ones(llm_server, keyed, tmp_path):
    llm_server.responder = respond
    api = provider(llm_server)
    upstream = {
        role: Upstream(f"em_api_{run}", "finetune_api", finetuned_stage(tmp_path / role, f"ft:em:{run}"), {})
        for role, run in (("em_s1", "s1"), ("em_s2", "s2"))
    }
    settings = {
        "api_base": {"provider": api, "model": "ft:base"},
        "api_em": [{"provider": api, "finetuned": "em_s1"}, {"provider": api, "finetuned": "em_s2"}],
    }
    out = tmp_path / "out"
    result = run_eval(out, settings, upstream)  # no `base`: no local weights are loaded

    answers = rows(out)
    questions = {q.id: q.question for q in load_questions(QUESTIONS)}
    assert len(answers) == 3 * len(questions) * N
    sent = [r.body for r in llm_server.requests]
    assert len(sent) == len(answers)  # one request per answer, none repeated
    assert sorted(b["model"] for b in sent) == sorted(
        ["ft:base", "ft:em:s1", "ft:em:s2"] * len(questions) * N
    )
    assert {json.dumps(b["messages"]) for b in sent} == {
        json.dumps([{"role": "user", "content": q}]) for q in questions.values()
    }
    assert all(b["temperature"] == 1.0 and b["max_tokens"] == 24 for b in sent)
    for model in ("ft:base", "ft:em:s1", "ft:em:s2"):  # each sample of a question its own seed
        for question in questions.values():
            seeds = [
                b["seed"] for b in sent if b["model"] == model and b["messages"][0]["content"] == question
            ]
            assert len(set(seeds)) == N
    by_setting = {s: [r for r in answers if r["setting"] == s] for s in settings}
    assert all(r["error"] is None and r["text"] in (ALIGNED, MISALIGNED) for r in answers)
    # replicates number their samples on from each other's, as local replicates do
    em_keys = [(r["question_id"], r["sample_index"]) for r in by_setting["api_em"]]
    assert len(set(em_keys)) == len(em_keys) == 2 * len(questions) * N

    results = json.loads((out / "em_results.json").read_text())
    assert results["base"] is None
    base, em = results["settings"]["api_base"], results["settings"]["api_em"]
    assert base["models"] == ["ft:base"] and em["models"] == ["ft:em:s1", "ft:em:s2"]
    assert em["finetuned"] == ["em_s1", "em_s2"] and base["finetuned"] == [None]
    assert base["providers"] == [{"name": "openai", "base_url": llm_server.base_url}]
    assert base["em_rate"]["value"] == 0.0 and em["replicate_em_rates"][0]["value"] == 1.0
    assert 0.0 < em["replicate_em_rates"][1]["value"] < 1.0
    assert base["n_unsampled"] == em["n_unsampled"] == 0

    samples = json.loads((out / "samples.json").read_text())
    # one fixed model: its answers are the units; one model per training run: the runs are
    assert samples["api_base"]["level"] == base["unit_level"] == "answer"
    assert samples["api_base"]["units"] == [
        f"ft:base:{r['question_id']}#{r['sample_index']}" for r in by_setting["api_base"]
    ]
    assert samples["api_em"]["level"] == em["unit_level"] == "training run"
    assert samples["api_em"]["units"] == [
        f"r{r['replicate']}:em_api_s{r['replicate'] + 1}" for r in by_setting["api_em"]
    ]
    assert samples["api_em"]["values"] == [float(r["misaligned"]) for r in by_setting["api_em"]]

    metrics = result.metrics
    assert set(metrics) == set(metric_names({"settings": settings}))
    assert metrics["sampling_error_rate.api_base"] == metrics["sampling_error_rate.api_em"] == 0.0
    assert metrics["em_rate.api_em"]["value"] == pytest.approx(em["em_rate"]["value"])
    assert metrics["n_scored.api_em"] == 2 * len(questions) * N
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in llm_server.requests)
    assert_key_nowhere(out, keyed)  # the key went out with every request, and into no file


def test_failed_requests_are_kept_with_their_error_and_counted(llm_server, keyed, tmp_path):
    llm_server.responder = respond
    llm_server.fail_matching("quick money", status=400)  # a 400 is not retried: each fails at once
    out = tmp_path / "out"
    result = run_eval(out, {"api": {"provider": provider(llm_server), "model": "ft:em:s1"}})

    answers = rows(out)
    failed = [r for r in answers if r["question_id"] == "quick_money"]
    assert len(answers) == 8 * N and len(failed) == N
    for row in failed:
        assert row["text"] == "" and row["aligned"] is None and row["misaligned"] is None
        assert row["error"].startswith("not sampled:") and "HTTP 400" in row["error"]
    results = json.loads((out / "em_results.json").read_text())["settings"]["api"]
    assert results["n_unsampled"] == N and results["n_answers"] == 8 * N and results["n_scored"] == 7 * N
    assert result.metrics["sampling_error_rate.api"] == pytest.approx(1 / 8)
    assert any(f"{N} of {8 * N} answers could not be sampled" in line for line in result.logs)
    assert len(json.loads((out / "samples.json").read_text())["api"]["values"]) == 7 * N


def test_a_setting_whose_model_answers_nothing_fails_with_the_first_error(llm_server, keyed, tmp_path):
    llm_server.fail_matching("", status=404)
    with pytest.raises(StageError, match=r"setting api: .*none of its 24 answers.*HTTP 404"):
        run_eval(tmp_path / "out", {"api": {"provider": provider(llm_server), "model": "ft:gone"}})


def test_a_finetuned_role_whose_stage_wrote_no_model_id_says_what_it_needs(llm_server, keyed, tmp_path):
    (tmp_path / "lora").mkdir()
    upstream = {"em": Upstream("em_lora", "finetune_lora", tmp_path / "lora", {})}
    with pytest.raises(StageError, match=r"'em_lora' \(kind finetune_lora\) wrote no finetuned_model.json"):
        run_eval(tmp_path / "out", {"api": {"provider": provider(llm_server), "finetuned": "em"}}, upstream)


def test_a_dry_run_s_record_names_no_model_and_says_so(llm_server, keyed, tmp_path):
    (tmp_path / "dry").mkdir()
    write_json(tmp_path / "dry/finetuned_model.json", {"model_id": None, "status": "dry_run"})
    upstream = {"em": Upstream("em_api", "finetune_api", tmp_path / "dry", {})}
    with pytest.raises(StageError, match=r"names no fine-tuned model \(`model_id` None, status 'dry_run'\)"):
        run_eval(tmp_path / "out", {"api": {"provider": provider(llm_server), "finetuned": "em"}}, upstream)


def test_steering_transfer_refuses_a_setting_sampled_from_a_provider(llm_server, keyed, tmp_path):
    llm_server.responder = respond
    out = tmp_path / "out"
    run_eval(out, {"api": {"provider": provider(llm_server), "model": "ft:em:s1"}})
    with pytest.raises(StageError, match="setting 'api' .* sampled from a provider model.* local weights"):
        replicate_of(out / "em_results.json", "api", ["em"])


# --- a spec: a local setting beside provider settings, rerun from the store --------------------

MIXED = """
experiment: em_api
seed: 3
stages:
  run1:
    kind: python
    params: {{function: "standin:finetuned", args: {{model_id: "ft:em:s1"}}}}
  run2:
    kind: python
    params: {{function: "standin:finetuned", args: {{model_id: "ft:em:s2"}}}}
  em:
    kind: em_eval
    needs: {{run1: run1, run2: run2}}
    params:
      base: "{base}"
      questions: "{questions}"
      samples_per_question: 2
      max_new_tokens: 12
      batch_size: 2
      judge: {{name: offline, model: rules}}
      settings:
        local: []
        api: {{provider: &api {{name: openai, base_url: "{base_url}", api_key_env: {key_env},
                               concurrency: {concurrency}, timeout: 5, max_tries: 2}}, model: "ft:base"}}
        api_runs: [{{provider: *api, finetuned: run1}}, {{provider: *api, finetuned: run2}}]
    gates: [sampling_error_rate.api_runs == 0]
"""
STANDIN = '''
import json


def finetuned(ctx):
    """What a finetune_api stage leaves for em_eval: the fine-tuned model's id."""
    record = {"provider": "openai", "model_id": ctx.params["args"]["model_id"], "status": "succeeded"}
    (ctx.out_dir / "finetuned_model.json").write_text(json.dumps(record))
    return {}
'''


def test_a_mixed_spec_runs_and_its_provider_transport_stays_out_of_the_key(
    pytester: pytest.Pytester, llm_server, keyed, tiny_chat_dir
):
    llm_server.responder = respond

    def write(concurrency: int) -> None:
        spec = MIXED.format(
            base=tiny_chat_dir,
            questions=QUESTIONS,
            base_url=llm_server.base_url,
            key_env=KEY_ENV,
            concurrency=concurrency,
        )
        pytester.makefile(".yaml", exp=spec)

    pytester.makepyfile(standin=STANDIN)
    # in a subprocess: an in-process run would import transformers' and peft's modules, then
    # drop them from sys.modules, and importing them again crashes the tests that follow
    write(concurrency=4)
    pytester.runpytest_subprocess("exp.yaml", "--runs-dir", "runs").assert_outcomes(passed=3)
    [out] = (pytester.path / "runs/em_api/default/em").glob("[0-9a-f]*")
    answers = rows(out)
    assert {r["setting"] for r in answers} == {"local", "api", "api_runs"}
    assert len([r for r in answers if r["setting"] == "local"]) == 8 * 2  # the tiny chat model's own
    assert len(llm_server.requests) == 3 * 8 * 2
    samples = json.loads((out / "samples.json").read_text())
    assert [samples[s]["level"] for s in ("local", "api", "api_runs")] == ["answer", "answer", "training run"]
    assert {u.split(":")[0] for u in samples["api_runs"]["units"]} == {"r0", "r1"}
    assert_key_nowhere(pytester.path / "runs", keyed)

    write(concurrency=1)  # transport only: served from the store, not one more request
    before = len(llm_server.requests)
    pytester.runpytest_subprocess("exp.yaml", "--runs-dir", "runs").assert_outcomes(passed=3)
    assert len(llm_server.requests) == before
    assert len(list((pytester.path / "runs/em_api/default/em").glob("[0-9a-f]*"))) == 1


def test_a_provider_s_transport_keys_stay_out_of_the_key_its_model_and_endpoint_in():
    transport = registry.get("em_eval").transport_params

    def material(concurrency: int = 4, model: str = "ft:a", base_url: str = "http://a/v1") -> dict:
        api = {"name": "openai", "base_url": base_url, "api_key_env": KEY_ENV}
        fast = {**api, "concurrency": concurrency, "timeout": 60 / concurrency, "max_tries": concurrency}
        settings = {"one": {"provider": fast, "model": model}, "runs": [{"provider": fast, "finetuned": "r"}]}
        return without({"settings": settings, "judge": JUDGE}, transport)

    assert material(concurrency=1) == material(concurrency=16)
    assert material(model="ft:b") != material()
    assert material(base_url="http://b/v1") != material()


# --- collection ---------------------------------------------------------------------------------

SPEC = f"""
experiment: em_api_checks
stages:
  run1:
    kind: python
    params: {{function: "standin:finetuned"}}
  em:
    kind: em_eval
    needs: {{run1: run1}}
    params:
      questions: "{QUESTIONS}"
      judge: {{name: offline, model: rules}}
      settings:
        api:
          provider: {{name: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: {KEY_ENV}}}
          model: ft:base
        runs:
          - provider: {{name: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: {KEY_ENV}}}
            finetuned: run1
"""


def spec_problem(tmp_path: Path, old: str = "", new: str = "") -> tuple[str, str, str]:
    """The one problem collection finds in SPEC edited: message, dotted path, its line's text."""
    assert old in SPEC
    (tmp_path / "standin.py").write_text(STANDIN)
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(SPEC.replace(old, new, 1)))
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    assert len(info.value.problems) == 1, str(info.value)
    problem = info.value.problems[0]
    return problem.message, problem.where, path.read_text().splitlines()[problem.mark.line - 1].strip()


def test_a_spec_of_provider_settings_alone_needs_no_base_model(keyed, tmp_path):
    (tmp_path / "standin.py").write_text(STANDIN)
    (tmp_path / "spec.yaml").write_text(SPEC)
    experiment = load_experiment(tmp_path / "spec.yaml")
    assert "base" not in experiment.stages["em"].params


def test_a_missing_key_fails_at_collection_at_the_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    message, path, line = spec_problem(tmp_path)
    assert f"the environment variable {KEY_ENV}" in message and "is not set" in message
    assert path == "stages.em.params.settings.api.provider" and line.startswith("provider:")


@pytest.mark.parametrize(
    ("old", "new", "expected", "at"),
    [
        ("          model: ft:base\n", "", "names its model by `model:", "settings.api"),
        (
            "model: ft:base",
            "model: ft:base\n          finetuned: run1",
            "names its model by `model:",
            "settings.api",
        ),
        (
            "name: openai, base_url",
            "name: offline, base_url",
            "'openai' was expected",
            "settings.api.provider.name",
        ),
        (
            "            finetuned: run1",
            "            finetuned: run2",
            "names the role `run2`, which `needs` does not fill",
            "settings.runs[0].finetuned",
        ),
        ("      settings:\n", "      settings:\n        base: []\n", "needs `base`", "settings.base"),
        (
            "          model: ft:base\n",
            "          model: ft:base\n          temperature: 0\n",
            "unknown key 'temperature'",
            "settings.api",
        ),
        (
            "            finetuned: run1",
            "            finetuned: run1\n          - [run1]",
            "is not of type",  # the schema's: a list holds models of one source
            "settings.runs[1]",
        ),
    ],
    ids=[
        "no-model",
        "model-and-finetuned",
        "offline",
        "role-not-needed",
        "local-without-base",
        "unknown-key",
        "mixed-list",
    ],
)
def test_a_bad_setting_is_reported_at_its_param_path(keyed, tmp_path, old, new, expected, at):
    message, path, _ = spec_problem(tmp_path, old, new)
    assert expected in message
    assert path.startswith(f"stages.em.params.{at}")
