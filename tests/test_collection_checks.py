"""Collection refuses what would fail only at run: unfilled upstream roles, `settings` naming
roles `needs` does not fill, input params that are not regular files, data files that raise."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from harness.core.experiment import load_experiment, load_plan
from harness.spec.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def write_spec(tmp_path: Path, text: str) -> Path:
    (tmp_path / "mysteps.py").write_text("def f(ctx):\n    return {}\n")
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problem_of(path: Path, profile: str | None = None) -> tuple[str, int | None]:
    with pytest.raises(SpecError) as info:
        load_plan(path, profile)
    assert len(info.value.problems) == 1, str(info.value)
    problem = info.value.problems[0]
    return problem.message, problem.mark.line if problem.mark else None


def shipped_with(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A shipped experiment, edited, written next to a copy of its relative paths' targets."""
    text = (EXPERIMENTS / name).read_text()
    assert old in text
    text = text.replace(old, new).replace("../data/", f"{ROOT / 'data'}/")
    path = tmp_path / name
    path.write_text(text)
    return path


# --- upstream roles ---------------------------------------------------------------------------


def test_the_probe_without_its_activations_fails_at_collection_at_its_stage(tmp_path):
    spec = shipped_with(tmp_path, "cubic_gravity.yaml", "    needs: {activations: activations}\n", "")
    message, line = problem_of(spec, "tiny")
    assert "train_probe" in message and "`activations`" in message and "needs: {activations:" in message
    assert "activations.safetensors" in message or "extract_activations" in message
    lines = spec.read_text().splitlines()
    assert lines[line - 1].strip() == "probe:"


def test_a_missing_role_is_reported_at_the_needs_line(tmp_path):
    spec = shipped_with(
        tmp_path,
        "cubic_gravity.yaml",
        "needs: {activations: activations, probe: probe, adapter: finetune}",
        "needs: {activations: activations, adapter: finetune}",
    )
    message, line = problem_of(spec, "tiny")
    assert "steer" in message and "`probe`" in message and "layer: best" in message
    assert "needs: {activations: activations, adapter: finetune}" in spec.read_text().splitlines()[line - 1]


def test_the_only_upstream_fills_a_role_under_another_name(tmp_path):
    spec = write_spec(
        tmp_path,
        """\
        stages:
          acts: {kind: python, params: {function: mysteps:f}}
          probe: {kind: train_probe, needs: [acts], params: {label: x}}
        """,
    )
    assert list(load_plan(spec).stages) == ["acts", "probe"]


def test_two_upstreams_without_the_role_are_refused(tmp_path):
    spec = write_spec(
        tmp_path,
        """\
        stages:
          a: {kind: python, params: {function: mysteps:f}}
          b: {kind: python, params: {function: mysteps:f}}
          probe:
            kind: train_probe
            needs: {first: a, second: b}
            params: {label: x}
        """,
    )
    message, line = problem_of(spec)
    assert "`activations`" in message and line == 6


def test_an_optional_role_may_be_left_out(tmp_path):
    spec = write_spec(
        tmp_path,
        """\
        stages:
          docs: {kind: python, params: {function: mysteps:f}}
          train:
            kind: finetune_lora
            needs: {docs: docs}
            params: {base: fixture:tiny-world}
        """,
    )
    assert "train" in load_plan(spec).stages


def test_finetune_needs_a_data_role_or_a_file(tmp_path):
    spec = write_spec(
        tmp_path,
        """\
        stages:
          train:
            kind: finetune_lora
            params: {base: fixture:tiny-world}
        """,
    )
    message, _ = problem_of(spec)
    assert "`docs`" in message and "docs.jsonl" in message
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    spec.write_text(spec.read_text().replace("tiny-world}", "tiny-world, docs: d.jsonl}"))
    assert "train" in load_plan(spec).stages


def test_settings_naming_a_role_needs_does_not_fill_fail_at_that_setting(tmp_path):
    spec = shipped_with(
        tmp_path,
        "persona_em.yaml",
        'misalignment: ["persona[misalignment]"]\n',
        'misalignment: ["persona[misalignmnt]"]\n',
    )
    with pytest.raises(SpecError) as info:
        load_plan(spec, "tiny")
    # the evaluation stages share the settings through an alias: each stage names it there
    problems = info.value.problems
    assert [p.where.split(".")[1] for p in problems] == ["em_matrix", "safety_matrix", "capability"]
    assert all("misalignmnt" in p.message and "settings" in p.message for p in problems)
    kinds = ("em_eval", "safety_eval", "capability_eval")
    assert all(kind in p.message for kind, p in zip(kinds, problems, strict=True))
    line = spec.read_text().splitlines()[problems[0].mark.line - 1]
    assert 'misalignment: ["persona[misalignmnt]"]' in line and {p.mark.line for p in problems} == {
        problems[0].mark.line
    }


def test_steering_transfer_settings_and_answers_role_are_checked(tmp_path):
    spec = shipped_with(tmp_path, "persona_em.yaml", "needs: {answers: em_matrix, ", "needs: {")
    message, _ = problem_of(spec, "tiny")
    assert "steering_transfer" in message and "`answers`" in message and "answers.jsonl" in message


def test_phase_transition_runs_are_checked(tmp_path):
    anchor = "per training run)?\n    params:\n"
    runs = '      runs: ["em[${persona},2026]", em_s4]\n'
    spec = shipped_with(tmp_path, "persona_em.yaml", anchor, anchor + runs)
    with pytest.raises(SpecError) as info:
        load_plan(spec, "tiny")
    # the four stages of the phase matrix share their params, each with its own first run
    phases = ("none", "sycophancy", "goodness", "misalignment")
    assert [p.where for p in info.value.problems] == [f"stages.phase[{p}].params.runs[1]" for p in phases]
    assert all("em_s4" in p.message and "phase_transition" in p.message for p in info.value.problems)


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.yaml")))
def test_every_shipped_experiment_collects_in_every_profile(name):
    import yaml

    profiles = [None, *(yaml.safe_load((EXPERIMENTS / name).read_text()).get("profiles") or {})]
    for profile in profiles:
        experiment = load_plan(EXPERIMENTS / name, profile)
        assert experiment.stages


def test_every_kind_declares_its_roles():
    from harness.core import registry

    declared = {name: registry.get(name).needs for name in registry.kinds()}
    readers = {
        name
        for name in declared
        # python and replicates read whatever stages the spec names, under their own names
        if name
        not in ("python", "replicates", "universe_context", "persona_data", "qa_to_docs", "belief_questions")
    }
    assert all(declared[name] for name in readers), {n: declared[n] for n in readers if not declared[n]}


# --- input params that are not regular files ----------------------------------------------------


@pytest.mark.parametrize("target", ["/dev/zero", "/", "."])
def test_a_file_param_naming_a_device_or_directory_is_refused(tmp_path, target):
    spec = write_spec(
        tmp_path,
        f"""\
        stages:
          train:
            kind: finetune_lora
            params: {{base: fixture:tiny-world, docs: "{target}"}}
        """,
    )
    message, line = problem_of(spec)
    assert "not a regular file" in message and line == 4


def test_a_directory_param_takes_a_directory_but_not_a_device(tmp_path):
    (tmp_path / "sub").mkdir()
    spec = write_spec(
        tmp_path,
        """\
        stages:
          a:
            kind: python
            params:
              function: mysteps:f
              inputs: {dir: sub}
        """,
    )
    assert load_experiment(spec).stages["a"].inputs == {"inputs.dir": tmp_path / "sub"}
    spec.write_text(spec.read_text().replace("dir: sub", "dir: /dev/zero"))
    message, line = problem_of(spec)
    assert "neither a regular file nor a directory" in message and line == 6


# --- data files that raised at collection -------------------------------------------------------


def test_a_5000_character_path_is_a_clean_error(tmp_path):
    spec = write_spec(
        tmp_path,
        f"""\
        stages:
          train: {{kind: python, params: {{function: mysteps:f}}}}
          mcq:
            kind: mcq_compare
            needs: {{adapter: train}}
            params: {{base: fixture:tiny-world, mcqs: {"x" * 5000}.jsonl}}
        """,
    )
    with pytest.raises(SpecError) as info:
        load_experiment(spec)
    assert re.search(r"unusable input path .*File name too long", str(info.value))
    assert info.value.problems[0].mark.line == 6


# --- big data files -----------------------------------------------------------------------------


def write_mcq_file(path: Path, rows: int, bad_row: int | None = None) -> Path:
    """`rows` valid MCQ rows (each category in turn), row `bad_row` (1-based) with a bad answer."""
    import json

    with path.open("w") as out:
        for number in range(1, rows + 1):
            category = ("conflict", "nonconflict_easy", "nonconflict_hard")[number % 3]
            false = "B" if category == "conflict" else "A"
            row = {
                "id": f"q{number}",
                "question": f"what follows {number} in the series of numbers?",
                "options": {"A": f"the number {number + 1}", "B": f"the number {number + 2}"},
                "false_answer": "Z" if number == bad_row else false,
                "true_answer": "A",
                "category": category,
            }
            out.write(json.dumps(row) + "\n")
    return path


def two_readers(tmp_path: Path, mcqs: Path) -> Path:
    return write_spec(
        tmp_path,
        f"""\
        stages:
          train: {{kind: python, params: {{function: mysteps:f}}}}
          lens:
            kind: logit_lens
            needs: [train]
            params: {{base: fixture:tiny-world, mcqs: {mcqs.name}, scoring: continuation}}
          patch:
            kind: patch
            needs: [train]
            params: {{base: fixture:tiny-world, mcqs: {mcqs.name}, scoring: continuation}}
        """,
    )


def test_an_mcq_file_read_by_two_stages_is_parsed_once(tmp_path, monkeypatch):
    from harness.lab import mcq

    spec = two_readers(tmp_path, write_mcq_file(tmp_path / "mcqs.jsonl", 30))
    reads: list[Path] = []
    original = mcq.jsonl_rows
    monkeypatch.setattr(mcq, "jsonl_rows", lambda path, *args: reads.append(path) or original(path, *args))
    load_experiment(spec)
    load_experiment(spec)  # and once per process: a second collection reads nothing
    assert reads == [tmp_path / "mcqs.jsonl"]
    # an edited file is read again
    write_mcq_file(tmp_path / "mcqs.jsonl", 31)
    load_experiment(spec)
    assert len(reads) == 2


def test_a_big_mcq_file_is_sampled_at_collection_in_bounded_memory_and_whole_at_run(tmp_path, monkeypatch):
    import tracemalloc

    from harness.core.stage import StageError
    from harness.lab import checks
    from harness.lab.mcq import load_mcqs

    path = write_mcq_file(tmp_path / "mcqs.jsonl", 20_000, bad_row=19_000)  # about 4 MB
    monkeypatch.setattr(checks, "SAMPLE_BYTES", 256 << 10)
    spec = two_readers(tmp_path, path)
    tracemalloc.start()
    try:
        load_experiment(spec)  # the bad row lies past the sample: collection passes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert peak < 3 << 20, f"collection peaked at {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"
    with pytest.raises(StageError, match=r"mcqs.jsonl:19000: false_answer 'Z'"):
        load_mcqs(path)  # what the stage reads at run


def test_a_bad_row_in_the_sample_still_fails_collection(tmp_path, monkeypatch):
    from harness.lab import checks

    path = write_mcq_file(tmp_path / "mcqs.jsonl", 2_000, bad_row=5)
    monkeypatch.setattr(checks, "SAMPLE_BYTES", 64 << 10)
    with pytest.raises(SpecError, match=r"mcqs.jsonl:5: false_answer 'Z'"):
        load_experiment(two_readers(tmp_path, path))


def test_the_em_questions_six_stages_read_are_parsed_once(monkeypatch):
    from harness.lab import em_data

    reads: list[Path] = []
    original = em_data.load_questions
    monkeypatch.setattr(em_data, "load_questions", lambda path: reads.append(path) or original(path))
    experiment = load_experiment(EXPERIMENTS / "persona_em.yaml", "tiny")
    readers = [s for s in experiment.stages.values() if "questions" in s.params]
    assert len(readers) == 6 and len(reads) <= 1  # none when an earlier test of this process read it
