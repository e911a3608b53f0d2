"""Run reports with plots: report.md links them, report.html embeds them, report.json lists them."""

from __future__ import annotations

import base64
import json
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from harness.report.html import to_html
from harness.report.markdown import markdown

# Writes the plots named in its args (hex-encoded bytes, so the test knows them exactly),
# then fails if asked to, and returns metrics taken from its args.
STEPS = """
import time

def step(ctx):
    args = ctx.params.get("args", {})
    for name, data in args.get("plots", {}).items():
        path = ctx.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes.fromhex(data))
    time.sleep(args.get("sleep", 0))
    if "fail" in args:
        raise RuntimeError(args["fail"])
    return {"value": args.get("value", 1), "note": args.get("note", ""), "seed": ctx.seed}
"""

SCRIPT = "<script>alert(1)</script>"


def png(rgb: tuple[int, int, int]) -> bytes:
    """A valid 1x1 PNG of one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(bytes([0, *rgb]))  # filter byte, then the pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


RED, BLUE, GREEN = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))


def stage(gates: tuple[str, ...] = (), needs: tuple[str, ...] = (), body: dict | None = None, **args) -> dict:
    """A python stage; `body` adds keys beside kind and params (seed, description, matrix)."""
    plots = {name: data.hex() for name, data in args.pop("plots", {}).items()}
    params = {
        "function": "steps:step",
        "metrics": ["value", "note", "seed"],
        "args": {**args, "plots": plots},
    }
    return {"kind": "python", "needs": list(needs), "params": params, "gates": list(gates), **(body or {})}


def write_spec(pytester: pytest.Pytester, description: str | None = None, **stages: dict) -> None:
    top = {"description": description} if description else {}
    pytester.makefile(".yaml", exp=json.dumps({"seed": 1, **top, "stages": stages}))  # JSON is YAML


@pytest.fixture
def world(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(steps=STEPS)
    return pytester


def report_dir(pytester: pytest.Pytester) -> Path:
    return pytester.path / "runs" / "exp" / "default"


def stages_json(pytester: pytest.Pytester) -> dict[str, dict]:
    data = json.loads((report_dir(pytester) / "report.json").read_text())
    return {s["stage"]: s for s in data["stages"]}


def page(pytester: pytest.Pytester) -> ET.Element:
    """report.html, parsed: the report writes it well-formed, so the standard library reads it."""
    text = (report_dir(pytester) / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(text.removeprefix("<!DOCTYPE html>\n"))


def images(root: ET.Element) -> dict[str, bytes]:
    """alt text -> decoded bytes of every embedded image."""
    out = {}
    for img in root.iter("img"):
        prefix, _, data = img.get("src", "").partition(",")
        assert prefix == "data:image/png;base64"
        out[img.get("alt")] = base64.b64decode(data, validate=True)
    return out


def md_images(pytester: pytest.Pytester) -> list[tuple[str, str]]:
    text = (report_dir(pytester) / "report.md").read_text()
    return re.findall(r"^!\[(.*)\]\((.*)\)$", text, flags=re.M)


def test_markdown_links_each_top_level_png_by_a_relative_path(world):
    plots = {"b.png": BLUE, "a.png": RED, "sub/deeper.png": GREEN, "notes.txt": b"not a plot"}
    write_spec(world, train=stage(plots=plots), other=stage())
    world.runpytest("exp.yaml").assert_outcomes(passed=2)
    key = stages_json(world)["train"]["key"]
    assert md_images(world) == [
        ("train: a.png", f"train/{key}/a.png"),
        ("train: b.png", f"train/{key}/b.png"),
    ]
    assert (report_dir(world) / f"train/{key}/a.png").read_bytes() == RED  # resolves from the report's dir
    assert stages_json(world)["train"]["plots"] == [f"train/{key}/a.png", f"train/{key}/b.png"]
    assert stages_json(world)["other"]["plots"] == []


def test_html_embeds_plots_and_loads_nothing_from_outside(world):
    write_spec(world, train=stage(plots={"loss.png": RED, "auc by layer.png": BLUE}))
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    root = page(world)
    assert images(root) == {"train: loss.png": RED, "train: auc by layer.png": BLUE}
    text = (report_dir(world) / "report.html").read_text()
    assert "<script" not in text and "<link" not in text and "http" not in text
    key = stages_json(world)["train"]["key"]
    assert ("train: auc by layer.png", f"train/{key}/auc%20by%20layer.png") in md_images(world)


def test_html_escapes_what_comes_from_specs_and_stages(world):
    write_spec(world, a=stage(note=SCRIPT), b=stage(fail=f"bad input {SCRIPT}"))
    world.runpytest("exp.yaml").assert_outcomes(passed=1, failed=1)
    text = (report_dir(world) / "report.html").read_text()
    assert "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    cells = [td.text for td in page(world).iter("td")]
    assert SCRIPT in cells  # the metric's value, shown as text
    assert any(c and c.startswith(f"RuntimeError: bad input {SCRIPT}") for c in cells)  # the failure


def test_failed_gate_and_failed_stage_are_marked(world):
    write_spec(
        world,
        ok=stage(gates=("value > 0",)),
        low=stage(value=1, gates=("value > 5",)),
        broken=stage(fail="boom"),
    )
    world.runpytest("exp.yaml").assert_outcomes(passed=1, failed=2)
    root = page(world)
    bad_rows = [
        [td.text or "".join(td.itertext()) for td in tr] for tr in root.iter("tr") if tr.get("class") == "bad"
    ]
    stage_rows = {row[0]: row for row in bad_rows if row[1] == "python"}
    assert set(stage_rows) == {"low", "broken"}
    assert stage_rows["low"][2] == "✗ failed" and stage_rows["broken"][2] == "✗ error"
    gate_rows = [row for row in bad_rows if row[1] != "python"]
    assert gate_rows == [["low", "value > 5", "1", "> 5", "FAILED", "exp.yaml:1"]]
    passed = [
        tr for tr in root.iter("tr") if tr.get("class") is None and "value > 0" in "".join(tr.itertext())
    ]
    assert len(passed) == 1  # the holding gate is not marked
    assert "| low | `value > 5` | 1 | > 5 | FAILED |" in (report_dir(world) / "report.md").read_text()


def test_reused_stage_shows_the_plots_of_the_run_it_reuses(world):
    write_spec(world, train=stage(plots={"loss.png": RED}), probe=stage(needs=("train",)))
    world.runpytest("exp.yaml").assert_outcomes(passed=2)
    first = stages_json(world)["train"]
    world.runpytest("exp.yaml").assert_outcomes(passed=2)
    again = stages_json(world)["train"]
    assert again["status"] == "reused"
    assert again["plots"] == first["plots"] == [f"train/{first['key']}/loss.png"]
    assert md_images(world) == [("train: loss.png", f"train/{first['key']}/loss.png")]
    assert images(page(world)) == {"train: loss.png": RED}


def test_long_metric_lists_are_shortened_in_md_and_html(tmp_path):
    stage_json = {
        "stage": "s",
        "kind": "python",
        "status": "ran",
        "outcome": "passed",
        "reason": "new",
        "key": "k",
        "duration_s": 1.0,
        "metrics": {"curve": [float(i) for i in range(100)], "short": [1, 2]},
        "gates": [],
        "plots": [],
    }
    report = {
        "experiment": "e",
        "profile": "p",
        "spec_file": "e.yaml",
        "description": "",
        "generated_at": "now",
        "summary": {"passed": 1},
        "run": {"executed": ["s"], "summary": {"passed": 1}, "partial": False, "stages_in_spec": 1},
        "stages": [stage_json],
        "aggregates": [],
    }
    shortened = "[0, 1, 2, …, 97, 98, 99] (100 values)"
    assert f"| curve | {shortened} |" in markdown(report)
    assert "| short | [1, 2] |" in markdown(report)
    values = [td.text for td in ET.fromstring(to_html(report, tmp_path).split("\n", 1)[1]).iter("td")]
    assert shortened in values and "[1, 2]" in values


GOLDEN = Path(__file__).parent / "golden"


def every_section(report_dir: Path) -> dict:
    """A report with every section and row shape: stages ran, reused, kept from an earlier run,
    failed and skipped, gates passed, failed and aborting, hypotheses, metrics of each shape,
    a plot and a missing one, an analysis, descriptions and replicates."""
    (report_dir / "train").mkdir(parents=True)
    (report_dir / "train/loss.png").write_bytes(RED)

    def gate(name: str, value, passed: bool, aborted: bool = False, problem: str | None = None) -> dict:
        return {
            "gate": name,
            "metric": name.split()[0].removeprefix("metrics."),
            "value": value,
            "op": ">=",
            "threshold": 0.5,
            "abort": 0.1 if aborted else None,
            "passed": passed,
            "aborted": aborted,
            "problem": problem,
            "where": "exp.yaml:12",
        }

    def stage(name: str, status: str, outcome: str, reason: str, **extra) -> dict:
        return {
            "stage": name,
            "kind": "python",
            "status": status,
            "outcome": outcome,
            "reason": reason,
            "key": extra.pop("key", f"{name}-key"),
            "duration_s": 1.5,
            "metrics": {},
            "gates": [],
            "plots": [],
            "analyses": [],
            "description": "",
            "ran_at": None,
            "ran_for_s": None,
            "earlier": None,
            **extra,
        }

    def hypothesis(hid: str, verdict: str, outcome: str, effect) -> dict:
        numbers = {"ci_low": 0.1, "ci_high": 0.9, "p_value": 0.012345, "p_adjusted": 0.05}
        numbers = {k: None if effect is None else v for k, v in numbers.items()}
        return {
            "id": hid,
            "claim": "c",
            "verdict": verdict,
            "outcome": outcome,
            "effect": effect,
            "alpha": 0.05,
            **numbers,
        }

    metrics = {
        "auc": {"value": 0.91234, "ci_low": 0.8, "ci_high": 0.97},
        "loss": [float(i) for i in range(9)],
        "n": 12,
        "missing": None,
        "note": "a | b <i>",
    }
    stages = [
        stage(
            "train",
            "ran",
            "passed",
            "new key",
            metrics=metrics,
            plots=["train/loss.png", "train/gone.png"],
            analyses=["train/shift analysis.txt"],
            description="Train <the> adapter | once.",
            gates=[gate("metrics.auc >= 0.5", 0.91234, True)],
        ),
        stage(
            "probe",
            "reused",
            "failed",
            "same key",
            ran_at="2025-12-30T00:00:00+00:00",
            ran_for_s=42.123,
            earlier="2025-12-31T00:00:00+00:00",
            gates=[
                gate("metrics.x >= 0.5", 0.2, False),
                gate("metrics.y >= 0.5", None, False, aborted=True, problem="no y"),
            ],
        ),
        stage("broken", "failed", "error", "RuntimeError: a | b\nsecond line", key=None),
        stage("after", "skipped", "skipped", "upstream broken failed", key=None),
    ]
    return {
        "experiment": "exp <&>",
        "profile": "tiny",
        "spec_file": "exp.yaml",
        "description": "Whether <training> helps.",
        "generated_at": "2026-01-01T00:00:00+00:00",
        "summary": {"passed": 1, "failed": 1, "error": 1, "skipped": 1},
        "run": {
            "executed": ["train", "broken", "after"],
            "summary": {"passed": 1, "error": 1, "skipped": 1},
            "partial": True,
            "stages_in_spec": 4,
        },
        "stages": stages,
        "aggregates": [
            {
                "group": "em[none,*]",
                "stages": ["em[none,1]", "em[none,2]"],
                "metric": "loss_drop",
                "n": 2,
                "mean": 0.25,
                "sd": 0.07071,
                "values": {"em[none,1]": 0.2, "em[none,2]": 0.3},
            }
        ],
        "hypotheses": {
            "status": "exploratory",
            "reason": "no lock",
            "correction": "holm",
            "report": "hypothesis_report.md",
            "results": [
                hypothesis("h1", "supported", "passed", 0.5),
                hypothesis("h2", "inconclusive", "failed", None),
            ],
        },
    }


@pytest.mark.parametrize("name", ["report.md", "report.html"])
def test_report_pages_are_unchanged_byte_for_byte(tmp_path, name):
    """Pins report.md and report.html of a report with every section (regenerate the files in
    tests/golden only for a change of the pages that is meant)."""
    report = every_section(tmp_path)
    page = markdown(report) if name == "report.md" else to_html(report, tmp_path)
    assert page == (GOLDEN / name).read_text(encoding="utf-8")


# -- partial runs ---------------------------------------------------------------------------


def report_json(pytester: pytest.Pytester) -> dict:
    return json.loads((report_dir(pytester) / "report.json").read_text())


def report_md(pytester: pytest.Pytester) -> str:
    return (report_dir(pytester) / "report.md").read_text()


def three_stages(world: pytest.Pytester) -> None:
    write_spec(world, train=stage(value=2, gates=("value > 1",)), probe=stage(needs=("train",)), lens=stage())


def test_a_partial_run_keeps_the_rows_of_the_stages_it_did_not_run(world):
    three_stages(world)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    full = report_json(world)
    world.runpytest("exp.yaml", "-k", "lens").assert_outcomes(passed=1)
    partial = report_json(world)
    rows = {s["stage"]: s for s in partial["stages"]}
    assert list(rows) == ["train", "probe", "lens"]
    assert partial["run"]["executed"] == ["lens"] and partial["run"]["partial"]
    assert rows["lens"]["earlier"] is None and rows["lens"]["status"] == "reused"
    assert rows["train"]["earlier"] == rows["probe"]["earlier"] == full["generated_at"]
    assert rows["train"]["gates"] == full["stages"][0]["gates"]  # the earlier gate, still shown
    assert partial["summary"] == {"passed": 3}
    md = report_md(world)
    assert "This run: 1 of 3 stages (lens); 2 rows come from earlier runs (marked)." in md
    assert f"| train | python | passed | ran | from an earlier run, {full['generated_at']}: new |" in md
    assert "| lens | python | passed | reused | cache hit" in md
    assert "- ✓ train: `value > 1` — measured 2 (passed)" in md
    # a second partial run keeps the time of the run the kept rows come from
    world.runpytest("exp.yaml::probe").assert_outcomes(passed=1)
    rows = {s["stage"]: s for s in report_json(world)["stages"]}
    assert report_json(world)["run"]["executed"] == ["train", "probe"]  # train resolved as probe's upstream
    assert rows["lens"]["earlier"] == partial["generated_at"]
    assert rows["train"]["earlier"] is None and rows["probe"]["earlier"] is None


def test_a_partial_run_without_an_earlier_report_takes_the_rows_from_the_store(world):
    three_stages(world)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    lens = stages_json(world)["lens"]
    finished = json.loads((report_dir(world) / f"lens/{lens['key']}/manifest.json").read_text())[
        "finished_at"
    ]
    for name in ("report.json", "report.md", "report.html"):
        (report_dir(world) / name).unlink()
    world.runpytest("exp.yaml", "-k", "train").assert_outcomes(passed=1)
    rows = stages_json(world)
    assert list(rows) == ["train", "probe", "lens"]
    assert rows["lens"]["status"] == "stored" and rows["lens"]["outcome"] == "not checked"
    assert rows["lens"]["earlier"] == finished and rows["lens"]["metrics"] == lens["metrics"]
    assert f"| lens | python | not checked | stored | from an earlier run, {finished}:" in report_md(world)


def test_a_whole_run_says_so_and_marks_nothing(world):
    three_stages(world)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    world.runpytest("exp.yaml").assert_outcomes(passed=3)
    assert all(s["earlier"] is None for s in stages_json(world).values())
    assert "This run: all 3 stages of the spec." in report_md(world)


# -- the story: descriptions, headline, analyses, durations of reused stages ----------------


def test_descriptions_of_the_experiment_and_its_stages_appear(world):
    write_spec(
        world,
        description="Whether <b>training</b> helps.",
        train=stage(body={"description": "Train on the documents."}),
        other=stage(),
    )
    world.runpytest("exp.yaml").assert_outcomes(passed=2)
    md = report_md(world)
    assert md.startswith("# exp — profile `default`\n\nWhether <b>training</b> helps.\n")
    assert "### train\n\nTrain on the documents.\n" in md
    assert report_json(world)["description"] == "Whether <b>training</b> helps."
    root = page(world)
    assert [p.text for p in root.iter("p") if p.get("class") == "description"] == [
        "Whether <b>training</b> helps.",
        "Train on the documents.",
    ]


def test_the_headline_comes_first_with_every_gate_and_the_metrics_they_read(world):
    write_spec(
        world,
        train=stage(value=3, note="not gated", gates=("value > 1", "value > 5")),
        other=stage(),
    )
    world.runpytest("exp.yaml").assert_outcomes(passed=1, failed=1)
    md = report_md(world)
    headline = md[md.index("## Headline") : md.index("## Stages")]
    assert "1 of 2 gates hold:" in headline
    assert "- ✓ train: `value > 1` — measured 3 (passed)" in headline
    assert "- ✗ train: `value > 5` — measured 3 (FAILED)" in headline
    assert "Headline metrics (the metrics the gates read):" in headline
    assert "| train | value | 3 |" in headline and "not gated" not in headline
    items = ["".join(li.itertext()) for li in page(world).iter("li")]
    assert items == ["✓ train: value > 1 — measured 3 (passed)", "✗ train: value > 5 — measured 3 (FAILED)"]


def test_analysis_files_are_linked(world):
    write_spec(
        world, compare=stage(plots={"behavioral_shift_analysis.txt": b"base vs adapter", "data.txt": b""})
    )
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    key = stages_json(world)["compare"]["key"]
    path = f"compare/{key}/behavioral_shift_analysis.txt"
    assert stages_json(world)["compare"]["analyses"] == [path]
    md = report_md(world)
    assert f"Analyses: [compare: behavioral_shift_analysis.txt]({path})" in md  # in the headline
    assert f"Analyses: [behavioral_shift_analysis.txt]({path})" in md  # in the stage's details
    assert (report_dir(world) / path).read_bytes() == b"base vs adapter"
    assert {a.get("href") for a in page(world).iter("a")} >= {path}


def test_a_reused_stage_shows_how_long_it_took_when_it_ran(world):
    write_spec(world, slow=stage(sleep=0.3))
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    ran = stages_json(world)["slow"]
    world.runpytest("exp.yaml").assert_outcomes(passed=1)
    reused = stages_json(world)["slow"]
    assert reused["status"] == "reused" and reused["duration_s"] < 0.3
    assert reused["ran_for_s"] == ran["ran_for_s"] >= 0.3
    assert reused["ran_at"] == ran["ran_at"]
    assert f"| {reused['ran_for_s']:.2f} when it ran |" in report_md(world)


# -- replicates -----------------------------------------------------------------------------


def test_stages_that_differ_only_by_seed_get_mean_sd_and_per_seed_values(world):
    write_spec(
        world,
        a=stage(value=4, body={"seed": 1}),
        a2=stage(value=4, body={"seed": 3}),
        other=stage(value=5, body={"seed": 2}),  # other params: not a replicate
        score=stage(body={"needs": {"model": "a"}}),
        score2=stage(body={"needs": {"model": "a2"}}),  # differs from score only through its upstream
        m=stage(value="${arm}", body={"matrix": {"arm": [10, 20], "seed": [5, 6, 8]}, "seed": "${seed}"}),
    )
    world.runpytest("exp.yaml").assert_outcomes(passed=11)
    rows = {(a["group"], a["metric"]): a for a in report_json(world)["aggregates"]}
    assert set(rows) == {
        (group, metric)
        for group in ("a, a2", "score, score2", "m[10,*]", "m[20,*]")
        for metric in ("value", "seed")
    }
    seeds = rows[("a, a2", "seed")]
    assert (
        seeds["values"] == {"a": 1, "a2": 3} and seeds["mean"] == 2 and seeds["sd"] == pytest.approx(2**0.5)
    )
    assert rows[("score, score2", "seed")]["values"] == {"score": 1, "score2": 1}  # the experiment's seed
    assert rows[("m[10,*]", "seed")]["values"] == {"m[10,5]": 5, "m[10,6]": 6, "m[10,8]": 8}
    assert rows[("m[20,*]", "value")]["mean"] == 20 and rows[("m[20,*]", "value")]["sd"] == 0
    md = report_md(world)
    assert "| m[10,*] | seed | 3 | 6.333 ± 1.528 | m[10,5]: 5, m[10,6]: 6, m[10,8]: 8 |" in md
    assert "| a, a2 | seed | 2 | 2 ± 1.414 | a: 1, a2: 3 |" in md
    cells = [td.text for td in page(world).iter("td")]
    assert "6.333 ± 1.528" in cells
