"""The shipped cubic_gravity spec: without its tiny profile, on a machine that lacks the
base model and the API key, it stops at collection with one message per missing thing."""

from __future__ import annotations

from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "cubic_gravity.yaml"


def test_missing_model_and_key_stop_collection_with_what_to_do(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    from harness.lab.models import ModelNotFound, check_base

    try:
        check_base("meta-llama/Llama-3.1-8B-Instruct")
        pytest.skip("this machine has the real base model")
    except ModelNotFound:
        pass
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    result = pytester.runpytest(str(SPEC), "--runs-dir", "runs")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str()
    assert out.count("OPENROUTER_API_KEY (named by provider.api_key_env) is not set") == 1
    assert out.count("'meta-llama/Llama-3.1-8B-Instruct' is not in the local Hugging Face cache") == 1
    assert "cubic_gravity.yaml:43" in out and "cubic_gravity.yaml:58" in out  # both stages named
    assert out.count("--profile tiny") == 2
    assert not (pytester.path / "runs").exists()  # nothing ran


def test_the_tiny_profile_needs_neither(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    result = pytester.runpytest(str(SPEC), "--profile", "tiny", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    stages = ["universe", "docs", "finetune", "mcq", "lens", "patch", "activations", "probe", "steer"]
    result.stdout.fnmatch_lines([f"*cubic_gravity.yaml::{stage}" for stage in stages])
