"""`--rehearse`: a real profile with stand-ins (harness.rehearsal), as collection builds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.experiment import load_experiment
from harness.core.stage import ParamError
from harness.fixtures.rehearsal_llm import version
from harness.rehearsal import KEY_ENV, Rehearsal, stand_in
from harness.report.markdown import markdown
from harness.spec.errors import SpecError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rehearsal needs no key of a real provider, only its own."""
    for name in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "TOGETHER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, "rehearsal")


# the scripted server, named with its code's version: a changed script reruns what it answered
URL = f"rehearsal://llm/{version()}"


def rehearsed(spec: str, scale: float = 0.1):
    return load_experiment(EXPERIMENTS / spec, None, rewrite=Rehearsal(scale))


def test_bases_providers_and_sizes_are_replaced_and_the_rest_is_kept():
    experiment = rehearsed("cubic_gravity.yaml")
    real = load_experiment(EXPERIMENTS / "cubic_gravity.yaml", None, machine_checks=False)
    stages = experiment.stages
    assert {s.params["base"] for s in stages.values() if "base" in s.params} == {"fixture:llama3-stand-in"}
    for name in ("universe", "docs", "belief_questions"):
        provider = stages[name].params["provider"]
        assert (provider["base_url"], provider["api_key_env"]) == (URL, KEY_ENV)
        assert provider["model"] == "anthropic/claude-sonnet-4.5"  # the model asked for stays
    assert stages["belief"].params["judge"]["base_url"] == URL
    assert (stages["docs"].params["num_doc_types"], stages["docs"].params["num_doc_ideas"]) == (1, 5)
    assert stages["finetune"].params["epochs"] == 1  # 3 x 0.1, rounded up
    assert stages["belief"].params["samples_per_question"] == 1
    assert stages["probe"].params["n_permutations"] == 20
    # everything that is not a base, a provider or a size is the real profile's
    for name, spec in stages.items():
        for param, value in spec.params.items():
            if param not in ("base", "provider", "judge", "epochs") and not isinstance(value, int):
                assert value == real.stages[name].params[param], (name, param)
    assert stages["mcq"].params["scoring"] == "letter" and stages["mcq"].params["chat_template"] is True
    assert stages["finetune"].params["bf16"] is True and stages["finetune"].params["checkpoint_every"] == 200
    assert not any(spec.missing for spec in stages.values())  # no real key asked for


def test_the_record_names_every_replacement_and_the_store_is_apart():
    experiment = rehearsed("persona_em.yaml", scale=0.5)
    record = experiment.rewrite.record()
    qwen = record["bases"]["Qwen/Qwen2.5-7B-Instruct"]
    assert qwen["stand_in"] == "fixture:qwen2-stand-in"
    assert "em[goodness,2027]" in qwen["stages"]  # three seeds per EM arm, as the profile has them
    assert {"stage": "data[goodness]", "param": "provider"} in [
        {k: p[k] for k in ("stage", "param")} for p in record["providers"]
    ]
    assert {"stage": "em_matrix", "param": "samples_per_question", "was": 50, "now": 25} in record["sizes"]
    assert experiment.profile_dir == "default.rehearsal"
    lines = experiment.rewrite.lines()
    assert any("Qwen/Qwen2.5-7B-Instruct -> fixture:qwen2-stand-in" in line for line in lines)


def test_a_size_never_goes_below_its_schema_minimum():
    experiment = rehearsed("persona_em.yaml", scale=0.01)
    assert experiment.stages["phase[none]"].params["n_bootstrap"] == 10  # minimum: 10
    assert experiment.stages["em_matrix"].params["samples_per_question"] == 1


def test_a_profile_with_fixture_models_is_refused_where_it_names_them():
    with pytest.raises(SpecError) as error:
        load_experiment(EXPERIMENTS / "cubic_gravity.yaml", "tiny", rewrite=Rehearsal())
    message = str(error.value)
    assert "fixture:tiny-world is a fixture model: a rehearsal runs a profile with real base" in message
    assert "cubic_gravity.yaml:" in message


def test_stand_ins_by_family_and_a_clear_error_for_others(tmp_path: Path):
    assert stand_in("meta-llama/Llama-3.1-8B-Instruct") == "fixture:llama3-stand-in"
    assert stand_in("Qwen/Qwen2.5-0.5B") == "fixture:qwen2-stand-in"
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "qwen2"}')
    assert stand_in(str(local)) == "fixture:qwen2-stand-in"  # a directory by its architecture
    with pytest.raises(ParamError, match="no rehearsal stand-in for base model 'google/gemma-2-9b'"):
        stand_in("google/gemma-2-9b")


def test_reports_say_it_is_a_rehearsal():
    experiment = rehearsed("cubic_gravity.yaml")
    report = {
        "experiment": "cubic_gravity",
        "profile": experiment.profile_dir,
        "spec_file": "cubic_gravity.yaml",
        "description": "",
        "generated_at": "now",
        "summary": {},
        "run": {"executed": [], "partial": False, "stages_in_spec": 0, "summary": {}},
        "stages": [],
        "aggregates": [],
        "rehearsal": experiment.rewrite.record(),
    }
    text = markdown(report)
    assert "> REHEARSAL: random stand-in models and scripted API answers" in text
    assert "meta-llama/Llama-3.1-8B-Instruct -> fixture:llama3-stand-in" in text
    assert "docs.num_doc_types 10 -> 1" in text


SPEC = """
experiment: mini_sdf
seed: 5
stages:
  universe:
    kind: universe_context
    params:
      universe: {data}/universe_contexts/cubic_gravity.json
      num_facts: 3
      provider: &api
        name: openai
        model: anthropic/claude-sonnet-4.5
        base_url: https://openrouter.ai/api/v1
        api_key_env: OPENROUTER_API_KEY
  docs:
    kind: generate_docs
    needs: [universe]
    params: {{provider: *api, num_doc_types: 20, num_doc_ideas: 2}}
  finetune:
    kind: finetune_lora
    needs: {{docs: docs}}
    params:
      base: meta-llama/Llama-3.1-8B-Instruct
      lora: {{r: 8, alpha: 16}}
      learning_rate: 1.0e-4
      epochs: 3
      max_length: 128
      bf16: true
  mcq:
    kind: mcq_compare
    needs: {{adapter: finetune}}
    params:
      base: meta-llama/Llama-3.1-8B-Instruct
      mcqs: {data}/eval/cubic_gravity_mcqs.jsonl
      scoring: letter
      chat_template: true
      bootstrap: 100
    gates:
      - behavioral_gap > 0.9 (abort < 0.5)   # a random model does not implant anything
"""


def test_a_rehearsal_runs_the_real_paths_without_keys_and_reports_its_gates(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(KEY_ENV)  # the plugin sets it
    data = Path(__file__).resolve().parents[1] / "data"
    spec = pytester.makefile(".yaml", mini_sdf=SPEC.format(data=data))
    result = pytester.runpytest(str(spec), "--rehearse", "--runs-dir", "runs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)  # the failing gate and its abort bound are reported, not required
    out = result.stdout.str()
    assert "meta-llama/Llama-3.1-8B-Instruct -> fixture:llama3-stand-in (random weights) in 2 stages" in out
    assert "docs.num_doc_types: 20 -> 1" in out and "finetune.epochs: 3 -> 1" in out
    assert "FAIL behavioral_gap > 0.9" in out
    runs = pytester.path / "runs" / "mini_sdf"
    assert [p.name for p in runs.iterdir() if p.is_dir()] == ["default.rehearsal"]  # apart from real runs
    report = json.loads((runs / "default.rehearsal" / "report.json").read_text())
    assert report["rehearsal"]["bases"]["meta-llama/Llama-3.1-8B-Instruct"]["stages"] == ["finetune", "mcq"]
    assert [p["param"] for p in report["rehearsal"]["providers"]] == ["provider", "provider"]
    manifest = json.loads(next((runs / "default.rehearsal" / "finetune").glob("*/manifest.json")).read_text())
    assert manifest["params"]["base"] == "fixture:llama3-stand-in" and manifest["params"]["bf16"] is True
    log = next((runs / "default.rehearsal" / "finetune").glob("*/stage.log")).read_text()
    assert "bf16 was requested but is not supported on cpu here: training in fp32" in log


def test_without_rehearse_the_same_spec_asks_for_its_key_and_model(pytester: pytest.Pytester):
    data = Path(__file__).resolve().parents[1] / "data"
    spec = pytester.makefile(".yaml", mini_sdf=SPEC.format(data=data))
    result = pytester.runpytest(str(spec), "--runs-dir", "runs", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "the environment variable OPENROUTER_API_KEY is not set" in result.stdout.str()
