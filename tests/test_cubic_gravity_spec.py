"""The shipped cubic_gravity spec: without its tiny profile, on a machine that lacks the
base model and the API key, it stops at collection with one message listing both."""

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
    # in a process of its own: with the model's lack recorded, the capability stage's check goes
    # on to read its lm-eval tasks, and `datasets` cannot be imported twice in one process
    result = pytester.runpytest_subprocess(str(SPEC), "--runs-dir", "runs")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str().split("short test summary")[0]  # one message for both (harness.core.preflight)
    assert out.count("the environment variable OPENROUTER_API_KEY is not set") == 1
    assert out.count("'meta-llama/Llama-3.1-8B-Instruct' is not in the local Hugging Face cache") == 1
    assert "`hf download meta-llama/Llama-3.1-8B-Instruct`" in out and "it is gated" in out
    assert "cubic_gravity.yaml:43, 58, " in out  # every stage that loads it named
    assert out.count("--profile tiny") == 1
    assert not (pytester.path / "runs").exists()  # nothing ran


def test_the_tiny_profile_needs_neither(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    result = pytester.runpytest(str(SPEC), "--profile", "tiny", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    stages = ["universe", "docs", "finetune", "mcq", "lens", "patch", "activations", "probe", "steer"]
    result.stdout.fnmatch_lines([f"*cubic_gravity.yaml::{stage}" for stage in stages])
