"""Pre-registered hypotheses: items, verdicts, the family's correction, the lock, and the reports."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from harness.core.experiment import load_experiment
from harness.hypotheses.evaluation import verdict
from harness.hypotheses.plan import Hypothesis, SampleRef, Term
from harness.lab import stats
from harness.spec.errors import SpecError

# A stage that backs hypotheses: it writes the sample sets named in its args to samples.json.
STEPS = """
import json, os

def samples(ctx):
    if os.environ.get("FAIL_IN") == ctx.stage:
        raise RuntimeError("boom in " + ctx.stage)
    sets = ctx.params["args"]["sets"]
    (ctx.out_dir / "samples.json").write_text(json.dumps(sets))
    return {"n": sum(len(v) for v in sets.values())}

def runs(ctx):
    # misaligned indicators: per set [rate, runs, answers per run]; 0 runs is one fixed model,
    # each answer its own unit. Each run's rate is drawn around `rate` (SD 0.03).
    import numpy as np
    rng = np.random.default_rng(ctx.params["args"]["seed"])
    sets = {}
    for name, (rate, k, n) in ctx.params["args"]["sets"].items():
        if k == 0:
            values = (rng.random(n) < rate).astype(float).tolist()
            sets[name] = {"values": values, "units": [f"{name}#{i}" for i in range(n)], "level": "answer"}
            continue
        values, units = [], []
        for run in range(k):
            p = min(1.0, max(0.0, rate + rng.normal(0, 0.03)))
            values += (rng.random(n) < p).astype(float).tolist()
            units += [f"{name}_run{run}"] * n
        sets[name] = {"values": values, "units": units, "level": "training run"}
    (ctx.out_dir / "samples.json").write_text(json.dumps(sets))
    return {"n": len(sets)}
"""

SETS = {
    "high": [1, 1, 1, 1, 1, 1],
    "low": [0, 0, 0, 0, 0, 0],
    "mixed": [0, 1, 0, 1, 0, 1],
    "mixed2": [1, 0, 1, 0, 1, 0],
    "some": [1, 1, 1, 1, 0, 0],  # against low: exact one-sided permutation p = 0.0303
}


def hypothesis(name: str, a: str, b: str, direction: str = "greater", alpha: float = 0.05, stage="em") -> str:
    return textwrap.indent(
        textwrap.dedent(f"""\
        {name}:
          claim: {name} says {a} beats {b}.
          metric: em_rate
          a: {{stage: {stage}, samples: {a}}}
          b: {{stage: em, samples: {b}}}
          test: permutation
          direction: {direction}
          alpha: {alpha}
          n_resamples: 2000
        """),
        "    ",
    )


# H1 is clearly supported, H2 clearly refuted, H3 inconclusive (equal means).
DEFAULT_TESTS = (
    hypothesis("H1", "high", "low") + hypothesis("H2", "low", "high") + hypothesis("H3", "mixed", "mixed2")
)


def make_spec(
    tests: str = DEFAULT_TESTS, correction="holm", on_inconclusive="fail", on_refuted="fail"
) -> str:
    sets = "".join(f"          {name}: {values}\n" for name, values in SETS.items())
    return (
        "seed: 3\n"
        "stages:\n"
        "  em:\n"
        "    kind: python\n"
        "    params:\n"
        "      function: steps:samples\n"
        "      metrics: [n]\n"
        "      args:\n"
        "        sets:\n"
        f"{sets}"
        "hypotheses:\n"
        f"  correction: {correction}\n"
        f"  on_inconclusive: {on_inconclusive}\n"
        f"  on_refuted: {on_refuted}\n"
        "  tests:\n"
        f"{tests}"
    )


@pytest.fixture
def world(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=make_spec())
    return pytester


def run_dir(pytester: pytest.Pytester, profile="default") -> Path:
    return pytester.path / "runs" / "exp" / profile


def hypotheses_json(pytester: pytest.Pytester, profile="default") -> dict:
    return json.loads((run_dir(pytester, profile) / "hypotheses.json").read_text())


def verdicts(pytester: pytest.Pytester) -> dict[str, tuple[str, str]]:
    return {h["id"]: (h["verdict"], h["outcome"]) for h in hypotheses_json(pytester)["hypotheses"]}


def lock(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("exp.yaml", "--lock-hypotheses", *args)


def every_report(pytester: pytest.Pytester) -> str:
    names = ("hypothesis_report.md", "hypotheses.json", "report.json", "report.md", "report.html")
    return "\n".join((run_dir(pytester) / name).read_text() for name in names)


def lines(result: pytest.RunResult, *patterns: str) -> None:
    """fnmatch_lines with `[` and `]` taken literally."""
    result.stdout.fnmatch_lines([p.replace("[", "?").replace("]", "?") for p in patterns])


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# -- verdict rules ---------------------------------------------------------------------------


def make_h(direction: str, alpha: float = 0.05) -> Hypothesis:
    terms = (Term(SampleRef("s", "x"), 1.0), Term(SampleRef("s", "y"), -1.0))
    return Hypothesis("H", "c", "m", terms, "permutation", direction, alpha, 100, 0.95)


def result(effect: float, low: float, high: float, p: float) -> stats.TestResult:
    interval = stats.Interval(effect, low, high)
    return stats.TestResult(effect, interval, p, "permutation", "greater", (5, 5), 100)


@pytest.mark.parametrize(
    ("direction", "effect", "low", "high", "p_adjusted", "expected"),
    [
        ("greater", 0.5, 0.2, 0.8, 0.01, "supported"),
        ("greater", 0.5, 0.2, 0.8, 0.05, "supported"),  # at alpha: rejected, as Holm's step-down does
        ("greater", 0.5, -0.1, 0.8, 0.06, "inconclusive"),
        ("greater", -0.5, -0.8, -0.2, 0.99, "refuted"),
        ("greater", -0.1, -0.3, 0.0, 0.9, "inconclusive"),  # CI touching 0 is not wholly on the wrong side
        ("less", -0.5, -0.8, -0.2, 0.01, "supported"),
        ("less", 0.5, 0.2, 0.8, 0.99, "refuted"),
        ("two-sided", -0.5, -0.8, -0.2, 0.01, "supported"),
        ("two-sided", -0.5, -0.8, -0.2, 0.2, "inconclusive"),  # two-sided: never refuted
    ],
)
def test_verdict_rules(direction, effect, low, high, p_adjusted, expected):
    got, why = verdict(make_h(direction), result(effect, low, high, p_adjusted), p_adjusted)
    assert got == expected, why


@pytest.mark.parametrize(
    ("effect", "low", "high", "p_adjusted", "expected"),
    [
        (0.01, -0.02, 0.04, 0.01, "supported"),  # significantly below the margin, though above 0
        (0.08, 0.06, 0.1, 0.99, "refuted"),  # the CI lies entirely above the margin
        (0.04, 0.0, 0.08, 0.3, "inconclusive"),  # the CI straddles the margin
    ],
)
def test_a_margin_is_the_bound_a_non_inferiority_claim_is_judged_against(
    effect, low, high, p_adjusted, expected
):
    h = dataclasses.replace(make_h("less"), margin=0.07)  # not alpha's 0.05: the why names the margin
    got, why = verdict(h, result(effect + 0.02, low + 0.02, high + 0.02, p_adjusted), p_adjusted)
    assert got == expected, why
    assert "0.07" in why


def test_a_margin_moves_the_null_of_both_tests():
    rng = np.random.default_rng(0)
    a = [[float(v)] for v in rng.normal(0.02, 0.01, 12)]
    b = [[float(v)] for v in rng.normal(0.0, 0.01, 12)]
    for test in ("bootstrap", "permutation"):
        plain = stats.contrast_test(test, [a, b], [1, -1], alternative="less", n_resamples=2000)
        bounded = stats.contrast_test(
            test, [a, b], [1, -1], alternative="less", n_resamples=2000, margin=0.05
        )
        assert plain.p_value > 0.5 and bounded.p_value < 0.01, test  # above 0, but well below 0.05
        assert bounded.effect == pytest.approx(plain.effect) and bounded.ci.low == pytest.approx(plain.ci.low)
    with pytest.raises(ValueError, match="one-sided"):
        stats.contrast_test("bootstrap", [a, b], [1, -1], alternative="two-sided", margin=0.05)


# -- items, policies, lock -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_refuted", "on_inconclusive", "outcomes", "items"),
    [
        ("fail", "fail", {"passed": 2, "failed": 2}, {"H1": "passed", "H2": "failed", "H3": "failed"}),
        ("report", "skip", {"passed": 3, "skipped": 1}, {"H1": "passed", "H2": "passed", "H3": "skipped"}),
        ("fail", "pass", {"passed": 3, "failed": 1}, {"H1": "passed", "H2": "failed", "H3": "passed"}),
    ],
)
def test_locked_run_is_preregistered_and_verdicts_follow_the_policies(
    world, on_refuted, on_inconclusive, outcomes, items
):
    world.makefile(".yaml", exp=make_spec(on_refuted=on_refuted, on_inconclusive=on_inconclusive))
    locked = lock(world)
    locked.assert_outcomes(passed=1)
    assert not (world.path / "runs").exists()  # locking runs no stage
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    assert entry["hypotheses"] == ["H1", "H2", "H3"] and len(entry["hash"]) == 64
    assert entry["git_commit"] is None and entry["locked_at"].endswith("+00:00")

    result = world.runpytest("exp.yaml", "-v", "-rs")
    result.assert_outcomes(**outcomes)
    # hypothesis items come after the stage items, each at its own line
    result.stdout.re_match_lines([r".*exp.yaml::em PASSED", r".*exp.yaml::H1 PASSED", r".*exp.yaml::H2 \w+"])
    data = hypotheses_json(world)
    assert data["registration"]["status"] == "pre-registered"
    assert {h["id"]: h["outcome"] for h in data["hypotheses"]} == items
    assert {h["id"]: h["verdict"] for h in data["hypotheses"]} == {
        "H1": "supported",
        "H2": "refuted",
        "H3": "inconclusive",
    }
    h1 = data["hypotheses"][0]
    assert h1["effect"] == 1.0 and h1["exact"] is True and h1["sets"][0]["n_units"] == 6
    assert h1["p_value"] == pytest.approx(1 / 924)  # one labelling of C(12, 6) is as extreme
    assert h1["p_adjusted"] == pytest.approx(3 / 924)  # Holm: the smallest of three, times 3
    report = (run_dir(world) / "hypothesis_report.md").read_text()
    assert "**Status: pre-registered** — the analysis matches the lock made at" in report
    assert "## H2: refuted" in report and "lies entirely below 0" in report
    lines(result, "*harness hypotheses*", "exp [default]: PRE-REGISTERED: the analysis matches*")
    if on_refuted == "fail":  # the failure states the claim, effect and CI, both p-values, alpha, verdict
        lines(
            result,
            "*hypothesis H2 (exp.yaml:*) REFUTED [pre-registered]: H2 says low beats high.",
            "*em_rate, contrast em: low - high",
            "*em['low'] (weight +1): mean 0 over 6 unit(s) of level 'value', 6 values; "
            "unit means 0: 0, 1: 0, *",
            "*em['high'] (weight -1): mean 1 over 6 unit(s) of level 'value', 6 values; *",
            "*effect = -1, 95% CI [-1, -1]",
            "*permutation test (exact) resampling whole units exchanged between the two sets (their unit "
            "means permuted), 2000 resamples, claimed greater (contrast > 0), 3 hypotheses: "
            "p = 1, holm-adjusted p = 1, alpha = 0.05",
            "*verdict: refuted: the 95% CI [-1, -1] lies entirely below 0*",
        )
    else:  # passes, with the verdict recorded in the terminal summary and the reports
        lines(result, "*REFUTED*H2*effect -1 [-1, -1]*-> passed")
    if on_inconclusive == "skip":
        skip = line_of(make_spec(), "    H3:")
        lines(
            result,
            f"SKIPPED [1] exp.yaml:{skip}: hypothesis H3 inconclusive [pre-registered]: H3 says*"
            "; contrast em: mixed - mixed2; means mixed 0.5 (6 x value), mixed2 0.5 (6 x value)"
            "; effect = 0, 95% CI [-0.5, 0.5]; permutation; p = 0.7165, holm-adjusted p = 1, alpha = 0.05"
            "; adjusted p 1*",
        )
    world.runpytest("exp.yaml", "--junitxml=j.xml")
    assert 'name="hypothesis.verdict" value="supported"' in (world.path / "j.xml").read_text()


def test_changing_a_hypothesis_after_locking_is_exploratory_and_relock_is_refused(world):
    lock(world).assert_outcomes(passed=1)
    before = (world.path / "exp.lock.json").read_text()
    world.makefile(".yaml", exp=make_spec(DEFAULT_TESTS.replace("alpha: 0.05", "alpha: 0.01", 1)))

    result = world.runpytest("exp.yaml")
    result.assert_outcomes(passed=2, failed=2)  # the verdicts themselves do not change
    out = result.stdout.str()
    assert "EXPLORATORY: the analysis differs from the lock made at" in out
    assert "plan.tests.H1.alpha: 0.05 -> 0.01" in out
    assert "[exploratory]" in out and "pre-registered" not in out.lower()
    report = (run_dir(world) / "hypothesis_report.md").read_text()
    assert "**Status: exploratory** — the analysis differs from the lock made at" in report
    assert "pre-registered" not in every_report(world).lower()

    refused = lock(world)
    refused.assert_outcomes(failed=1)
    lines(
        refused,
        "*the analysis of exp.yaml [default] differs from the lock made at*",
        "*plan.tests.H1.alpha: 0.05 -> 0.01*",
    )
    lines(refused, "*run again with --relock*")
    assert (world.path / "exp.lock.json").read_text() == before

    lock(world, "--relock").assert_outcomes(passed=1)
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    assert entry["plan"]["tests"]["H1"]["alpha"] == 0.01
    assert entry["previous"][0]["hash"] == json.loads(before)["profiles"]["default"]["hash"]

    # the samples existed before this lock: they may have been seen, so they stay exploratory,
    # also when a seeded rerun reproduces them after it
    assert list(entry["existing_keys"]) == ["em"]
    for args in ((), ("--rerun", "em")):
        world.runpytest("exp.yaml", *args).assert_outcomes(passed=2, failed=2)
        registration = hypotheses_json(world)["registration"]
        assert registration["status"] == "exploratory"
        assert "already existed in the store when the lock made at" in registration["reason"]


def test_without_a_lock_the_run_is_exploratory_and_a_same_plan_relock_is_a_no_op(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=2, failed=2)
    assert hypotheses_json(world)["registration"]["reason"].startswith("no lock file (exp.lock.json)")
    assert "pre-registered" not in every_report(world).lower()
    html = (run_dir(world) / "report.html").read_text().removeprefix("<!DOCTYPE html>\n")
    cells = [td.text for td in ET.fromstring(html).iter("td")]  # well-formed, with a row per hypothesis
    assert ["H1", "supported"] == cells[cells.index("H1") : cells.index("H1") + 2]
    assert "✗ failed" in cells[cells.index("H2") : cells.index("H2") + 3]
    lock(world).assert_outcomes(passed=1)
    first = (world.path / "exp.lock.json").read_text()
    # writing a default out does not change the plan
    world.makefile(
        ".yaml",
        exp=make_spec(
            DEFAULT_TESTS.replace("n_resamples: 2000", "n_resamples: 2000\n      confidence: 0.95")
        ),
    )
    result = lock(world)
    result.assert_outcomes(passed=1)
    lines(result, "*harness hypotheses locked*", "exp [default]: unchanged: already locked at*")
    assert (world.path / "exp.lock.json").read_text() == first


def test_a_lock_is_per_profile(world):
    world.makefile(".yaml", exp=make_spec() + "profiles:\n  tiny:\n    hypotheses: {on_refuted: report}\n")
    lock(world).assert_outcomes(passed=1)
    world.runpytest("exp.yaml", "--profile", "tiny").assert_outcomes(passed=3, failed=1)
    reason = hypotheses_json(world, "tiny")["registration"]["reason"]
    assert reason.startswith("exp.lock.json holds no lock for profile 'tiny'")
    shutil.rmtree(world.path / "runs")  # results seen before a lock never become pre-registered
    lock(world, "--profile", "tiny").assert_outcomes(passed=1)
    world.runpytest("exp.yaml", "--profile", "tiny").assert_outcomes(passed=3, failed=1)
    assert hypotheses_json(world, "tiny")["registration"]["status"] == "pre-registered"
    assert set(json.loads((world.path / "exp.lock.json").read_text())["profiles"]) == {"default", "tiny"}


def test_the_lock_records_the_git_commit_of_the_spec(world):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=world.path, capture_output=True, text=True, check=True
        ).stdout

    git("init", "-q")
    git("add", "exp.yaml", "steps.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "plan")
    lock(world).assert_outcomes(passed=1)
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    assert entry["git_commit"] == git("rev-parse", "HEAD").strip() and entry["git_dirty"] is False
    world.runpytest("exp.yaml")
    assert f"(commit {entry['git_commit'][:12]})" in hypotheses_json(world)["registration"]["reason"]


def test_lock_runs_nothing_else(world):
    world.makepyfile(test_other="def test_x():\n    raise AssertionError('ran')\n")
    world.makefile(".yaml", plain="stages:\n  a: {kind: python, params: {function: 'steps:samples'}}\n")
    result = world.runpytest("exp.yaml", "plain.yaml", "test_other.py", "--lock-hypotheses", "-rs")
    result.assert_outcomes(passed=1, skipped=1, deselected=1)
    lines(result, "*plain.yaml has no `hypotheses:` section to lock*")
    assert not (world.path / "runs").exists()
    assert "--relock only goes with --lock-hypotheses" in world.runpytest("--relock").stderr.str()


def test_locking_needs_the_code_behind_the_plan(world):
    text = make_spec().replace("steps:samples", "elsewhere:samples")  # e.g. a module left uncommitted
    world.makefile(".yaml", exp=text)
    result = world.runpytest("exp.yaml")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    lines(result, "*cannot find module 'elsewhere'*")
    refused = lock(world)  # the lock covers the code that produces the samples
    refused.assert_outcomes(failed=1)
    lines(refused, "*stage 'em': cannot find module 'elsewhere'*the lock covers the code of every stage*")
    world.makefile(".yaml", exp=text.replace("stage: em,", "stage: emm,", 1))  # a spec mistake still stops it
    refused = lock(world)
    assert refused.ret == pytest.ExitCode.INTERRUPTED
    lines(refused, "*hypotheses.tests.H1.a.stage: unknown stage 'emm'; did you mean 'em'?")


# -- the family's correction -----------------------------------------------------------------


@pytest.mark.parametrize(("correction", "expected"), [("holm", "inconclusive"), ("none", "supported")])
def test_holm_across_the_family_changes_a_verdict(world, correction, expected):
    tests = hypothesis("H1", "some", "low") + hypothesis("H2", "mixed", "mixed2")
    world.makefile(".yaml", exp=make_spec(tests, correction=correction, on_inconclusive="pass"))
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    h1, h2 = hypotheses_json(world)["hypotheses"]
    assert h1["p_value"] == pytest.approx(28 / 924) and h1["p_value"] < 0.05  # raw: below alpha
    adjusted = {"holm": 2 * h1["p_value"], "none": h1["p_value"]}[correction]
    assert h1["p_adjusted"] == pytest.approx(adjusted)  # holm: the smaller of two p-values, times 2
    assert (h1["verdict"], h2["verdict"]) == (expected, "inconclusive")
    assert h1["correction"] == correction and h1["family_size"] == 2


# -- errors ----------------------------------------------------------------------------------


def test_a_hypothesis_naming_a_missing_stage_is_a_collection_error_at_its_line(world):
    text = make_spec(hypothesis("H1", "high", "low", stage="emm"))
    world.makefile(".yaml", exp=text)
    result = world.runpytest("exp.yaml")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    line = line_of(text, "stage: emm")
    lines(result, f"*exp.yaml:{line}:*: hypotheses.tests.H1.a.stage: unknown stage 'emm'; did you mean 'em'?")
    assert "Traceback" not in result.stdout.str()


def test_a_hypothesis_named_like_a_stage_is_an_error(world):
    world.makefile(".yaml", exp=make_spec(hypothesis("em", "high", "low")))
    result = world.runpytest("exp.yaml")
    lines(result, "*hypotheses.tests.em: hypothesis 'em' has the name of a stage*")


def test_a_missing_sample_set_fails_at_run_time_listing_the_names(world):
    tests = hypothesis("H1", "hihg", "low") + hypothesis("H2", "high", "low")
    world.makefile(".yaml", exp=make_spec(tests))
    result = world.runpytest("exp.yaml")
    result.assert_outcomes(passed=2, failed=1)
    lines(
        result,
        "*hypothesis H1 (exp.yaml:*): stage 'em' has no sample set 'hihg' in *samples.json; "
        "did you mean 'high'? it has: 'high', 'low', 'mixed', 'mixed2', 'some'",
    )
    assert "Traceback" not in result.stdout.str()
    h1, h2 = hypotheses_json(world)["hypotheses"]
    assert h1["verdict"] == "error"
    assert h2["p_adjusted"] == pytest.approx(2 * h2["p_value"])  # H1 stays in the family, with p = 1


def test_a_failed_stage_skips_the_hypotheses_that_read_it(world, monkeypatch):
    monkeypatch.setenv("FAIL_IN", "em")
    result = world.runpytest("exp.yaml", "-rs")
    result.assert_outcomes(failed=1, skipped=3)
    skipped = [line for line in result.stdout.lines if line.startswith("SKIPPED")]
    assert len(skipped) == 3
    assert all("stage 'em' failed: RuntimeError: boom in em" in line for line in skipped)
    assert {h["verdict"] for h in hypotheses_json(world)["hypotheses"]} == {"untested"}


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "      alpha: 0.05",
            "      alpah: 0.05",
            "hypotheses.tests.H1: unknown key 'alpah'; did you mean 'alpha'?",
        ),
        (
            "  correction: holm",
            "  corection: holm",
            "hypotheses: unknown key 'corection'; did you mean 'correction'?",
        ),
        (
            "{stage: em, samples: high}",
            "{stage: em, sample: high}",
            "unknown key 'sample'; did you mean 'samples'?",
        ),
        (
            "      test: permutation",
            "      test: t-test",
            "'t-test' is not one of ['permutation', 'bootstrap']",
        ),
        ("      alpha: 0.05", "      alpha: 5", "5 is greater than or equal to the maximum of 1"),
    ],
)
def test_the_schema_rejects_unknown_fields_and_bad_values_at_their_line(tmp_path, old, new, message):
    (tmp_path / "steps.py").write_text(STEPS)
    text = make_spec(hypothesis("H1", "high", "low")).replace(old, new, 1)
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        load_experiment(tmp_path / "exp.yaml")
    assert message in str(info.value)
    problem = next(p for p in info.value.problems if message in p.message or message in p.render())
    assert problem.mark.line == line_of(text, new.strip())  # (a misspelt key also leaves one missing)
    assert "exp.yaml:" in str(info.value)


def test_a_margin_on_a_two_sided_claim_is_refused_at_its_line(tmp_path):
    (tmp_path / "steps.py").write_text(STEPS)
    text = make_spec(hypothesis("H1", "high", "low", direction="two-sided")).replace(
        "      alpha: 0.05", "      margin: 0.05\n      alpha: 0.05", 1
    )
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(SpecError, match="a margin bounds a one-sided claim") as info:
        load_experiment(tmp_path / "exp.yaml")
    assert info.value.problems[0].mark.line == line_of(text, "margin: 0.05")


def test_a_bad_hypothesis_in_an_unselected_profile_is_reported(tmp_path):
    (tmp_path / "steps.py").write_text(STEPS)
    text = make_spec() + "profiles:\n  tiny:\n    hypotheses:\n      tests:\n        H1: {a: {stage: nope}}\n"
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        load_experiment(tmp_path / "exp.yaml")
    assert "unknown stage 'nope'" in str(info.value)
    assert [p.mark.line for p in info.value.problems] == [len(text.splitlines())]


# -- selection and xdist ---------------------------------------------------------------------


def test_selecting_one_hypothesis_resolves_its_stages_and_the_whole_family(world):
    result = world.runpytest("exp.yaml::H1")
    result.assert_outcomes(passed=1)
    data = hypotheses_json(world)
    assert [h["id"] for h in data["hypotheses"]] == ["H1"]
    assert data["hypotheses"][0]["family_size"] == 3  # the correction still spans the plan
    assert (
        "Not run in this session (deselected): H2, H3."
        in (run_dir(world) / "hypothesis_report.md").read_text()
    )
    assert json.loads((run_dir(world) / "report.json").read_text())["stages"][0]["stage"] == "em"


def test_hypotheses_run_with_their_stages_under_xdist(world):
    lock(world).assert_outcomes(passed=1)
    result = world.runpytest("exp.yaml", "-n", "2", "--dist", "loadgroup")
    result.assert_outcomes(passed=2, failed=2)
    data = hypotheses_json(world)  # the controller got every verdict from the worker
    assert data["registration"]["status"] == "pre-registered"
    assert [h["verdict"] for h in data["hypotheses"]] == ["supported", "refuted", "inconclusive"]
    items, _ = world.inline_genitems("exp.yaml")
    groups = {item.name: item.get_closest_marker("xdist_group").args for item in items}
    assert len(set(groups.values())) == 1 and list(groups) == ["em", "H1", "H2", "H3"]


# -- contrasts at the level of replication ---------------------------------------------------

# The tiny profile's rates: a persona misaligned by itself (0.32) on which the EM adapter adds
# nothing, and EM adding +0.04 on the base model. Three EM training runs per EM set.
RUNS = """\
seed: 3
stages:
  em:
    kind: python
    params:
      function: steps:runs
      metrics: [n]
      args:
        seed: 5
        sets:
          base: [0.09, 0, 480]
          misalignment: [0.32, 0, 480]
          em: [0.13, 3, 160]
          misalignment_em: [0.31, 3, 160]
          one_run_em: [0.25, 1, 480]
hypotheses:
  on_inconclusive: pass
  on_refuted: report
  tests:
"""


def run_hypotheses(pytester: pytest.Pytester, tests: str) -> dict[str, dict]:
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=RUNS + textwrap.indent(textwrap.dedent(tests), "    "))
    result = pytester.runpytest("exp.yaml", "-rs")
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    return {h["id"]: h for h in hypotheses_json(pytester)["hypotheses"]}


def test_a_persona_misaligned_by_itself_does_not_make_an_interaction(pytester):
    found = run_hypotheses(
        pytester,
        """\
        raw:
          claim: The misalignment persona with EM is more misaligned than EM alone.
          metric: em_rate
          a: {stage: em, samples: misalignment_em}
          b: {stage: em, samples: em}
          test: bootstrap
          direction: greater
          alpha: 0.05
        susceptibility:
          claim: EM adds more on the misalignment persona than on no persona.
          metric: em_rate
          stage: em
          contrast: (misalignment_em - misalignment) - (em - base)
          test: bootstrap
          direction: greater
          alpha: 0.05
        """,
    )
    raw, interaction = found["raw"], found["susceptibility"]
    assert raw["verdict"] == "supported" and raw["effect"] > 0.15  # the raw rates differ a lot...
    assert interaction["verdict"] != "supported" and interaction["effect"] < 0.05  # ...the interaction not
    assert interaction["contrast"] == "em: misalignment_em - misalignment - em + base"
    sets = {s["samples"]: s for s in interaction["sets"]}
    assert {name: (s["weight"], s["n_units"], s["level"]) for name, s in sets.items()} == {
        "misalignment_em": (1, 3, "training run"),
        "misalignment": (-1, 480, "answer"),
        "em": (-1, 3, "training run"),
        "base": (1, 480, "answer"),
    }
    assert sum(s["weight"] * s["mean"] for s in sets.values()) == pytest.approx(interaction["effect"])
    assert list(sets["em"]["unit_means"]) == ["em_run0", "em_run1", "em_run2"]
    assert sets["base"]["unit_means"] is None  # 480 units: too many to list
    report = (run_dir(pytester) / "hypothesis_report.md").read_text()
    assert "- contrast: `em: misalignment_em - misalignment - em + base`" in report
    assert "| `em` `misalignment_em` | +1 |" in report and "| 3 | training run | 480 |" in report
    assert "resampling each set on its own, in two stages: its units with replacement" in report


def test_too_few_units_for_any_power_are_reported_and_never_supported(pytester):
    found = run_hypotheses(
        pytester,
        """\
        one_run:
          claim: EM from one training run raises the rate above the base model.
          metric: em_rate
          a: {stage: em, samples: one_run_em}
          b: {stage: em, samples: base}
          test: bootstrap
          direction: greater
          alpha: 0.05
        three_and_three:
          claim: The misalignment persona with EM differs from EM alone.
          metric: em_rate
          a: {stage: em, samples: misalignment_em}
          b: {stage: em, samples: em}
          test: permutation
          direction: two-sided
          alpha: 0.05
        """,
    )
    one, three = found["one_run"], found["three_and_three"]
    assert one["verdict"] == "inconclusive" and one["p_value"] < 0.05  # the answers alone would say yes
    assert one["why"] == one["power"]
    assert one["power"].startswith("no power: em['one_run_em'] has 1 unit(s) of level 'training run'")
    assert "a bootstrap needs at least 3 units per set" in one["power"]
    # the most extreme of C(6, 3) = 20 labellings of six run means, and its mirror image: p >= 0.1
    assert three["verdict"] == "inconclusive" and three["p_value"] == pytest.approx(0.1)
    assert three["power"].startswith(
        "no power: with 3 x 'training run' and 3 x 'training run' units the smallest p a permutation "
        "test can give (two-sided) is 0.1, above alpha 0.05, whatever the data"
    )
    assert "- power: no power: with 3 x" in (run_dir(pytester) / "hypothesis_report.md").read_text()


def test_a_contrast_outside_the_grammar_is_a_spec_error_at_its_line(tmp_path):
    (tmp_path / "steps.py").write_text(STEPS)
    body = """\
        H1:
          claim: c
          metric: em_rate
          stage: em
          contrast: (misalignment_em - misalignment - (em - base)
          test: bootstrap
          direction: greater
          alpha: 0.05
        H2:
          claim: c
          metric: em_rate
          stage: em
          contrast: {misalignment_em: 1, em: -1}
          a: {stage: em, samples: em}
          test: bootstrap
          direction: greater
          alpha: 0.05
        H3:
          claim: c
          metric: em_rate
          stage: emm
          contrast: em - base
          test: permutation
          direction: greater
          alpha: 0.05
        H4:
          claim: c
          metric: em_rate
          stage: em
          contrast: (em - base) - (misalignment_em - misalignment)
          test: permutation
          direction: greater
          alpha: 0.05
    """
    text = RUNS + textwrap.indent(textwrap.dedent(body), "    ")
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        load_experiment(tmp_path / "exp.yaml")
    found = {p.where: (p.message, p.mark.line) for p in info.value.problems}
    assert found["hypotheses.tests.H1.contrast"] == (
        "expected ')' at column 46 of '(misalignment_em - misalignment - (em - base)', found the end",
        line_of(text, "contrast: (misalignment_em - misalignment - (em"),
    )
    assert found["hypotheses.tests.H2.stage"][0].startswith("a hypothesis states either `contrast`")
    unknown = ("unknown stage 'emm'; did you mean 'em'?", line_of(text, "emm"))
    assert found["hypotheses.tests.H3.stage"] == unknown
    assert found["hypotheses.tests.H4.test"][0] == (
        "a permutation compares two sets, a - b (weights 1 and -1); for a contrast of 4 sets with "
        "weights 1, -1, -1, 1 use test: bootstrap"
    )


def test_a_set_the_stage_did_not_write_is_named_with_a_suggestion(pytester):
    found = run_hypotheses(
        pytester,
        """\
        H1:
          claim: c
          metric: em_rate
          stage: em
          contrast: {misalignment_emm: 1, misalignment: -1, em: -1, base: 1}
          test: bootstrap
          direction: greater
          alpha: 0.05
        """,
    )
    assert found["H1"]["verdict"] == "error"
    assert "stage 'em' has no sample set 'misalignment_emm'" in found["H1"]["why"]
    assert "did you mean 'misalignment_em'?" in found["H1"]["why"]
