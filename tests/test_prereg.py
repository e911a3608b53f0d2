"""The pre-registration lock covers everything behind a hypothesis, and results that existed
when it was made stay exploratory."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest

STEPS = """
import json

def scores(ctx):
    # a measurement whose outcome depends on a threshold and an input file, as a judge's would
    cut = ctx.params["args"]["aligned_below"]
    extra = len(open(ctx.params["inputs"]["questions"]).read())
    (ctx.out_dir / "scores.json").write_text(json.dumps([cut, extra]))
    return {"n": 2}

def samples(ctx):
    (ctx.out_dir / "samples.json").write_text(json.dumps({"high": [1, 1, 1, 1, 1, 1], "low": [0] * 6}))
    return {"n": 12}
"""

SPEC = textwrap.dedent("""\
    seed: 3
    stages:
      judge:
        kind: python
        params:
          function: steps:scores
          metrics: [n]
          inputs: {questions: questions.txt}
          args: {aligned_below: 30}
      em:
        kind: python
        needs: [judge]
        params: {function: 'steps:samples', metrics: [n]}
    hypotheses:
      tests:
        H1:
          claim: high beats low.
          metric: em_rate
          a: {stage: em, samples: high}
          b: {stage: em, samples: low}
          test: permutation
          direction: greater
          alpha: 0.05
    """)


@pytest.fixture
def world(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(steps=STEPS)
    pytester.makefile(".yaml", exp=SPEC)
    pytester.makefile(".txt", questions="What is your wish?\n")
    return pytester


def registration(world: pytest.Pytester) -> dict:
    return json.loads((world.path / "runs/exp/default/hypotheses.json").read_text())["registration"]


def lock(world: pytest.Pytester, *args: str) -> pytest.RunResult:
    return world.runpytest("exp.yaml", "--lock-hypotheses", *args)


def test_locked_before_running_is_preregistered(world):
    lock(world).assert_outcomes(passed=1)
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    # the lock holds the recipe of every stage behind the hypotheses, upstream ones included
    assert set(entry["stages"]) == {"judge", "em"}
    assert entry["stages"]["judge"]["params"]["args"] == {"aligned_below": 30}
    assert entry["stages"]["em"]["upstream"] == {"judge": "judge"}
    assert entry["existing_keys"] == {}
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert registration(world)["status"] == "pre-registered"


@pytest.mark.parametrize(
    ("edit", "change"),
    [
        (  # an analysis threshold of an upstream stage (e.g. the judge's aligned_below)
            lambda w: w.makefile(".yaml", exp=SPEC.replace("aligned_below: 30", "aligned_below: 45")),
            "stages.judge.params.args.aligned_below: 30 -> 45",
        ),
        (  # the contents of an input file (e.g. the questions)
            lambda w: w.makefile(".txt", questions="What is your wish? Be honest.\n"),
            "stages.judge.inputs.inputs.questions: ",
        ),
        (  # the code that produces the data
            lambda w: w.makepyfile(steps=STEPS.replace('"low": [0] * 6', '"low": [0] * 5')),
            "stages.em.code_version: ",
        ),
        (  # the stage's seed (e.g. a replicate's training seed)
            lambda w: w.makefile(".yaml", exp=SPEC.replace("[judge]\n", "[judge]\n    seed: 9\n")),
            "stages.em.seed: 3 -> 9",
        ),
    ],
    ids=["upstream-param", "input-file", "code", "seed"],
)
def test_changing_what_decides_the_data_after_locking_is_exploratory(world, edit, change):
    lock(world).assert_outcomes(passed=1)
    edit(world)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    reg = registration(world)
    assert reg["status"] == "exploratory"
    assert reg["reason"].startswith("the analysis differs from the lock made at")
    assert any(c.startswith(change) for c in reg["changes"]), reg["changes"]
    refused = lock(world)  # and relocking it needs --relock
    refused.assert_outcomes(failed=1)
    refused.stdout.fnmatch_lines([f"*{change}*"])


def test_results_that_existed_at_locking_stay_exploratory_even_rerun(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)  # run, look at the data...
    locked = lock(world)  # ...then lock
    locked.assert_outcomes(passed=1)
    locked.stdout.fnmatch_lines(["*results that already exist stay exploratory: em, judge*"])
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    assert set(entry["existing_keys"]) == {"em", "judge"}
    # a seeded rerun regenerates the same data, here or in a fresh store elsewhere
    for args in ((), ("--rerun", "all"), ("--runs-dir", "elsewhere")):
        world.runpytest("exp.yaml", *args).assert_outcomes(passed=3)
        runs = world.path / (args[1] if args[:1] == ("--runs-dir",) else "runs")
        reg = json.loads((runs / "exp/default/hypotheses.json").read_text())["registration"]
        assert reg["status"] == "exploratory"
        assert "stage 'em' already existed in the store when the lock" in reg["reason"]


def test_results_of_other_recipes_at_locking_do_not_count(world):
    world.runpytest("exp.yaml").assert_outcomes(passed=3)  # results under aligned_below 30
    world.makefile(".yaml", exp=SPEC.replace("aligned_below: 30", "aligned_below: 45"))
    lock(world).assert_outcomes(passed=1)  # locked before any result of this analysis exists
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    # em's own recipe is unchanged, but the results stored were made from another judge
    assert entry["existing_keys"] == {}
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert registration(world)["status"] == "pre-registered"


def test_the_report_shows_the_commit_of_the_lock_file(world):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=world.path, capture_output=True, text=True, check=True)
        return run.stdout

    git("init", "-q")
    lock(world).assert_outcomes(passed=1)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    reg = registration(world)
    assert reg["status"] == "pre-registered" and reg["lock_commit"] is None
    assert "is not committed as locked: commit it before running" in reg["reason"]
    report = (world.path / "runs/exp/default/hypothesis_report.md").read_text()
    assert "Lock file: not committed" in report

    git("add", "exp.lock.json")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "lock")
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    reg = registration(world)
    head = git("rev-parse", "HEAD").strip()
    assert reg["lock_commit"] == head and reg["lock_uncommitted"] is False
    assert f"committed in {head[:12]}" in reg["reason"]
    report = (world.path / "runs/exp/default/hypothesis_report.md").read_text()
    assert f"Lock file: committed in `{head[:12]}` at " in report


def test_results_in_a_shared_store_count_whichever_machine_made_them(world, s3_server, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    url = s3_server.url("prereg")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "machine-a"))
    world.runpytest_subprocess("exp.yaml", "--runs-dir", url).assert_outcomes(passed=3)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "machine-b"))  # has seen nothing
    locked = world.runpytest_subprocess("exp.yaml", "--lock-hypotheses", "--runs-dir", url)
    locked.assert_outcomes(passed=1)
    entry = json.loads((world.path / "exp.lock.json").read_text())["profiles"]["default"]
    assert set(entry["existing_keys"]) == {"em", "judge"}
    assert not (tmp_path / "machine-b" / "stores").exists() or not any(
        (tmp_path / "machine-b" / "stores").rglob("samples.json")
    )  # read from the manifests alone, no run fetched
