"""Live progress of long loops: throttled lines with a rate and the time left, on the terminal
with and without xdist, and work set aside (fixture builds) reported on its own lines and
left out of the stage's duration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.core.paths import cache_dir
from harness.core.progress import Progress, aside, duration, per_time, running_stage
from harness.lab.models import base
from harness.lab.models.base import FixtureBuildLog


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_throttled_and_say_the_rate_and_the_time_left():
    clock, lines = FakeClock(), []
    progress = Progress(lines.append, "training", "steps", every=5, clock=clock)
    for step in range(1, 401):
        clock.now += 0.5  # 2 steps a second
        progress(step, 400, f"loss {1 / step:.3f}")
    # every 5 s (10 steps) at first, then every tenth of the time elapsed, then the end
    assert lines[0] == "training: 10/400 steps, 2.0 steps/s, ~3m15s left (loss 0.100)"
    assert lines[1].startswith("training: 20/400 steps, 2.0 steps/s, ~3m10s left")
    assert lines[-1] == "training: 400/400 steps in 3m20s (2.0 steps/s, loss 0.003)"
    assert 15 < len(lines) < 30  # not 400
    shown = [int(re.match(r"training: (\d+)/", line)[1]) for line in lines]
    gaps = [b - a for a, b in zip(shown, shown[1:], strict=False)]
    assert gaps[0] == 10 and max(gaps) > 20  # sparser as the loop goes on


def test_the_rate_counts_from_the_first_update_not_from_work_done_before():
    clock, lines = FakeClock(), []
    progress = Progress(lines.append, "documents", "docs", every=5, clock=clock)
    progress(300, 400)  # resumed: 300 were done by an interrupted run
    for done in range(301, 401):
        clock.now += 6.0  # one document every 6 s
        progress(done, 400)
    assert lines[0] == "documents: 301/400 docs, 10.0 docs/min, ~9m54s left"
    assert lines[-1] == "documents: 400/400 docs in 10m00s (10.0 docs/min)"


def test_a_short_loop_logs_only_its_end_and_track_counts_each_item():
    clock, lines = FakeClock(), []
    progress = Progress(lines.append, "judging", "answers", clock=clock)
    seen = []
    for item in progress.track(["a", "b", "c"]):
        clock.now += 0.1
        seen.append(item)
    assert seen == ["a", "b", "c"]
    assert lines == ["judging: 3/3 answers in 0.3s (10.0 answers/s)"]
    with pytest.raises(TypeError, match="give the total"):
        list(Progress(lines.append, "x").track(iter([1])))


def test_durations_and_rates_read_at_a_glance():
    assert [duration(s) for s in (0.42, 42.4, 185, 7620)] == ["0.4s", "42s", "3m05s", "2h07m"]
    assert per_time(3.14, "steps") == "3.1 steps/s"
    assert per_time(1234.0, "tokens") == "1,234 tokens/s"
    assert per_time(0.05, "docs") == "3.0 docs/min"
    assert per_time(0.0001, "runs") == "0.4 runs/h"


def test_a_fixture_build_log_becomes_progress_with_the_loss():
    clock, lines = FakeClock(), []
    log = FixtureBuildLog(lines.append, "building fixture:tiny-world", "(once, cached in C)", clock)
    log("tiny world: 40 facts, 3000 steps")
    for step in range(0, 3000, 100):
        clock.now += 10
        log(f"tiny world: step {step}/3000 loss {2 - step / 3000:.3f}")
    clock.now += 1
    log("tiny world: step 2999/3000 loss 1.001")
    assert log.building
    assert lines[0] == "building fixture:tiny-world (once, cached in C): tiny world: 40 facts, 3000 steps"
    assert lines[1] == "building fixture:tiny-world: 1/3000 steps (loss 2.000)"  # no rate yet
    assert lines[2] == "building fixture:tiny-world: 101/3000 steps, 10.0 steps/s, ~4m50s left (loss 1.967)"
    assert lines[-1] == "building fixture:tiny-world: 3000/3000 steps in 5m01s (10.3 steps/s, loss 1.001)"


class FixtureModule:
    """What resolve_base asks of a fixture module: `build(log=...)`, here as fast as told."""

    def __init__(self, clock: FakeClock, seconds: float, logs: bool):
        self.clock, self.seconds, self.logs = clock, seconds, logs

    def build(self, log):
        if self.logs:
            log("tiny world: step 0/10 loss 3.000")
        self.clock.now += self.seconds
        return Path("/built")


@pytest.mark.parametrize(
    ("seconds", "logs", "said"),
    [
        (97, True, "building fixture:fake (once, cached in {cache}): done in 1m37s"),
        (95, False, "waited 1m35s for another process building fixture:fake (once, cached in {cache})"),
        (0.01, False, None),  # cached: nothing to say
    ],
)
def test_a_fixture_build_is_a_line_of_its_own_and_not_the_stage_s_time(monkeypatch, seconds, logs, said):
    clock, lines = FakeClock(), []
    monkeypatch.setattr(base, "_fixtures", lambda: {"fake": FixtureModule(clock, seconds, logs)})
    with running_stage(lines.append) as running:
        assert base._built("fixture:fake", clock) == Path("/built")
    assert running.set_aside == pytest.approx(seconds)
    assert lines[-1:] == ([said.format(cache=cache_dir())] if said else [])


def test_time_set_aside_is_reported_to_the_running_stage_and_counted_apart():
    clock, lines = FakeClock(), []
    with running_stage(lines.append) as running:
        with aside(clock) as log:
            log("building the world")
            clock.now += 97
    assert lines == ["building the world"] and running.set_aside == 97
    with aside(clock) as log:  # outside a stage: printed, counted nowhere
        assert log is print


KIND = """
import time
from harness.api import stage_kind
from harness.core.progress import aside

@stage_kind(name="slow", schema=None, metrics=("n",))
def run(ctx):
    with aside() as log:  # as a fixture model's build: not the stage's duration
        log("building the thing")
        time.sleep(1.5)
    progress = ctx.progress("training", "steps", every=0.1)
    for step in range(1, 21):
        time.sleep(0.03)
        progress(step, 20)
    return {"n": 20}

def pytest_harness_stage_kinds():
    return [run]
"""

LINE = re.compile(r"\[exp::train\] training: \d+/20 steps, [\d.,]+ steps/s, ~[\d.]+s left")


@pytest.fixture
def slow(pytester):
    pytester.makeconftest(KIND)
    pytester.makefile(".yaml", exp="stages:\n  train: {kind: slow}\n")
    return pytester


def manifest(pytester) -> dict:
    stage = pytester.path / "runs/exp/default/train"
    return json.loads((stage / (stage / "LATEST").read_text().strip() / "manifest.json").read_text())


def test_progress_lines_show_on_the_terminal_and_a_build_is_not_the_stage_s_duration(slow):
    result = slow.runpytest_subprocess("exp.yaml", "--runs-dir", "runs")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert LINE.search(out), out
    assert "[exp::train] training: 20/20 steps in " in out
    assert "[exp::train] building the thing" in out
    assert manifest(slow)["duration_s"] < 1.4  # the 1.5 s set aside are not counted


def test_progress_lines_of_xdist_workers_show_on_the_controller_s_terminal(slow):
    result = slow.runpytest_subprocess("exp.yaml", "--runs-dir", "runs", "-n", "2")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert LINE.search(out), out
    assert "[exp::train] training: 20/20 steps in " in out
    assert "[exp::train] building the thing" in out


def test_quiet_runs_show_no_progress(slow):
    for options in ([], ["-n", "2"]):
        result = slow.runpytest_subprocess("exp.yaml", "--runs-dir", f"runs{len(options)}", "-q", *options)
        result.assert_outcomes(passed=1)
        assert "training:" not in result.stdout.str() and "building the thing" not in result.stdout.str()
