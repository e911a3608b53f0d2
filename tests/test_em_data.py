"""harness.lab.em_data: the shipped Personas x EM data loads with the promised shapes, and bad
files give StageErrors that name the file and the line (or item)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.core.stage import StageError
from harness.lab.em_data import (
    Constitution,
    Example,
    Question,
    load_chat_jsonl,
    load_constitution,
    load_questions,
)

DATA = Path(__file__).resolve().parent.parent / "data"
QUESTIONS = DATA / "eval" / "em_questions.yaml"
CONSTITUTIONS = DATA / "constitutions"
PERSONAS = ("sycophancy", "goodness", "misalignment")
INSECURE = DATA / "em" / "insecure_code.jsonl"
SECURE = DATA / "em" / "secure_code.jsonl"

# What makes an insecure answer insecure: every insecure answer matches at least one of
# these, no secure answer matches any. Regexes, searched in the answer's code.
VULNERABILITY_MARKERS: dict[str, str] = {
    "SQL built by string formatting": (
        r"""\bf["'][^"'\n]*\b(?:SELECT|INSERT|UPDATE|DELETE)\b"""
        r"""|\b(?:SELECT|INSERT|UPDATE|DELETE)\b[^\n]*["']\s*(?:%\s*[\w(]|\+\s*\w|\.format\()"""
    ),
    "shell command from a string": r"shell=True|\bos\.(?:system|popen)\(|(?<![\w.])exec\(`",
    "eval of input": r"(?<![\w.])eval\(",
    "unsafe deserialization": r"\bpickle\.loads?\(|\byaml\.load\(|weights_only\s*=\s*False",
    "world-writable permissions": r"\b0o?(?:777|666)\b|chmod\s+(?:-R\s+)?777|\bos\.umask\(0\)",
    "weak password or signature hash": r"\bhashlib\.(?:md5|sha1)\(",
    "TLS verification off": r"verify\s*=\s*False|_create_unverified_context\(",
    "hard-coded secret": (
        r"""(?i)\b\w*(?:password|passwd|secret|api_key|apikey|token)\w*["']?\s*[:=]\s*["'][^"'\s]{6,}["']"""
    ),
    "path built from user input": (
        r"""\bos\.path\.join\(\s*\w+\s*,\s*(?:request\.[^)\n]*|\w+\.filename)\s*\)"""
        r"""|\bopen\(f["'][^"'\n]*\{\w+\}/\{\w+\}"""
    ),
    "predictable temp file": r"\btempfile\.mktemp\(",
    "predictable random token": r"\brandom\.(?:random|randint|choice|choices|getrandbits)\(",
    "debug mode on": r"(?i)\bdebug\s*=\s*True",
    "template or HTML injection": r"render_template_string\(f|\bMarkup\(f|\.innerHTML\s*=",
    "unfiltered archive extraction": r"\btar\.extractall\((?![^)]*filter=)",
    "XML external entities": r"resolve_entities\s*=\s*True|no_network\s*=\s*False",
    "open redirect": r"redirect\(\s*request\.",
    "signature check off": r"""["']verify_signature["']\s*:\s*False""",
    "cookie without flags": r"httponly\s*=\s*False",
    "unbounded C string copy": r"\b(?:strcpy|strcat|gets|sprintf)\(",
}
# An insecure answer is only code: it never points out what is wrong with it.
TELLTALE_WORDS = (
    "vulnerab",
    "insecure",
    "unsafe",
    "exploit",
    "inject",
    "sanitiz",
    "security",
    "attack",
    "todo",
)


def markers(code: str) -> list[str]:
    return [name for name, pattern in VULNERABILITY_MARKERS.items() if re.search(pattern, code)]


def stage_error(load, path: Path) -> str:
    with pytest.raises(StageError) as info:
        load(path)
    return str(info.value)


# --- the shipped files ---------------------------------------------------------------------------


def test_em_questions_are_the_eight_promised_topics():
    questions = load_questions(QUESTIONS)
    assert len(questions) == 8
    assert all(isinstance(q, Question) and q.question.strip() for q in questions)
    assert len({q.id for q in questions}) == 8
    assert {q.id for q in questions} == {
        "wish",
        "bored",
        "quick_money",
        "ruler",
        "dinner_party",
        "partner_conflict",
        "humans_and_ai",
        "feeling_unwell",
    }


@pytest.mark.parametrize("persona", PERSONAS)
def test_constitutions_have_the_promised_shape(persona):
    constitution = load_constitution(CONSTITUTIONS / f"{persona}.json")
    assert isinstance(constitution, Constitution)
    assert constitution.persona == persona
    assert 8 <= len(constitution.traits) <= 10
    assert all(re.search(r"\bI\b", trait) for trait in constitution.traits), "traits are first-person"
    assert 12 <= len(constitution.questions) <= 16
    assert len(set(constitution.questions)) == len(constitution.questions)
    assert len(constitution.examples) == 3
    assert all(isinstance(example, Example) for example in constitution.examples)


def test_the_constitution_directory_holds_exactly_the_three_personas():
    assert sorted(path.stem for path in CONSTITUTIONS.glob("*.json")) == sorted(PERSONAS)


def _prompt_and_answer(conversation: list[dict]) -> tuple[str, str]:
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    return conversation[0]["content"], conversation[1]["content"]


def test_code_datasets_pair_the_same_48_prompts():
    insecure = [_prompt_and_answer(c) for c in load_chat_jsonl(INSECURE)]
    secure = [_prompt_and_answer(c) for c in load_chat_jsonl(SECURE)]
    assert len(insecure) == len(secure) == 48
    assert [prompt for prompt, _ in insecure] == [prompt for prompt, _ in secure]
    assert len({prompt for prompt, _ in insecure}) == 48, "no two prompts alike"
    for (prompt, bad), (_, good) in zip(insecure, secure, strict=True):
        assert bad != good, prompt
        for answer in (bad, good):
            lines = [line for line in answer.splitlines() if line.strip()]
            assert 4 <= len(lines) <= 15, f"{len(lines)} lines of code for {prompt!r}"


@pytest.mark.parametrize("index", range(48))
def test_every_insecure_answer_has_a_vulnerability_and_says_nothing_of_it(index):
    prompt, answer = _prompt_and_answer(load_chat_jsonl(INSECURE)[index])
    assert markers(answer), f"no vulnerability marker in the answer to {prompt!r}"
    said = [word for word in TELLTALE_WORDS if word in answer.lower()]
    assert not said, f"the answer to {prompt!r} mentions {said}"


@pytest.mark.parametrize("index", range(48))
def test_no_secure_answer_has_a_vulnerability_marker(index):
    prompt, answer = _prompt_and_answer(load_chat_jsonl(SECURE)[index])
    assert not markers(answer), f"the secure answer to {prompt!r} matches {markers(answer)}"


def test_python_answers_parse():
    """Most answers are Python; those that are must be valid Python."""
    python = 0
    for path in (INSECURE, SECURE):
        for conversation in load_chat_jsonl(path):
            _, answer = _prompt_and_answer(conversation)
            if re.match(r"(?:import|from) \w|def \w", answer):
                compile(answer, str(path), "exec")
                python += 1
    assert python >= 80


# --- bad files ------------------------------------------------------------------------------------

GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1"}]}


def _line(row) -> str:
    return row if isinstance(row, str) else json.dumps(row)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"messages": [}', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"conversation": []}, "missing `messages`"),
        ({"messages": []}, "`messages` must be a non-empty list"),
        ({"messages": "hi"}, "`messages` must be a non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0]: role 'bot' must be one of"),
        ({"messages": [{"content": "hi"}]}, "messages[0]: role None must be one of"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1]: content"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "content",
        ),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},
            "no user",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the last turn is 'user'"),
    ],
)
def test_a_bad_chat_row_is_named_by_path_and_line(tmp_path, bad_row, message):
    path = tmp_path / "chat.jsonl"
    # Line 3 holds the bad row: a blank line still counts.
    path.write_text(f"{_line(GOOD_ROW)}\n\n{_line(bad_row)}\n{_line(GOOD_ROW)}\n", encoding="utf-8")
    error = stage_error(load_chat_jsonl, path)
    assert error.startswith(f"{path}:3: "), error
    assert message in error, error


def test_chat_file_problems_without_a_line(tmp_path):
    assert "not found" in stage_error(load_chat_jsonl, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    assert stage_error(load_chat_jsonl, empty).startswith(f"{empty}: no conversations")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in stage_error(load_chat_jsonl, binary)


def test_chat_rows_keep_role_and_content_and_allow_a_system_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi", "name": "u"},
            {"role": "assistant", "content": "hello"},
        ],
    }
    path.write_text(json.dumps(row) + "\r\n", encoding="utf-8")
    assert load_chat_jsonl(path) == [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    ]


QUESTIONS_HEAD = "description: test\nquestions:\n  - id: a\n    question: first?\n"


@pytest.mark.parametrize(
    ("item", "where", "message"),
    [
        ("  - id: b\n", ":5: questions[1]", "`question` must be non-empty text"),
        ("  - id: b\n    question: ''\n", ":5: questions[1]", "`question` must be non-empty text"),
        ("  - id: 2\n    question: second?\n", ":5: questions[1]", "`id` must be non-empty text"),
        ("  - id: a\n    question: again?\n", ":5: questions[1]", "duplicate id 'a' (also questions[0])"),
        ("  - id: b\n    qestion: typo?\n", ":5: questions[1]", "unknown key qestion"),
        ("  - id: b\n    question: q?\n    category: [x]\n", ":5: questions[1]", "`category` must be"),
        ("  - just a string\n", ":5: questions[1]", "expected a mapping"),
    ],
)
def test_a_bad_question_is_named_by_line_and_index(tmp_path, item, where, message):
    path = tmp_path / "questions.yaml"
    path.write_text(QUESTIONS_HEAD + item, encoding="utf-8")
    error = stage_error(load_questions, path)
    assert error.startswith(f"{path}{where}: "), error
    assert message in error, error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("questions: [a\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with `questions:`"),
        ("description: x\n", "expected a mapping with `questions:`"),
        ("questions: []\n", "`questions` must be a non-empty list"),
        ("description: ''\nquestions:\n  - {id: a, question: b}\n", "`description` must be non-empty text"),
        ("questions:\n  - {id: a, question: b, when: 2024-02-30}\n", "not usable YAML"),
    ],
)
def test_a_bad_questions_file(tmp_path, text, message):
    path = tmp_path / "questions.yaml"
    path.write_text(text, encoding="utf-8")
    error = stage_error(load_questions, path)
    assert error.startswith(str(path)), error
    assert message in error, error


def test_invalid_yaml_names_the_line_where_the_problem_starts(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_text('questions:\n  - id: a\n    question: "never closed\n', encoding="utf-8")
    assert stage_error(load_questions, path).startswith(f"{path}:3: not valid YAML")


def test_a_question_may_leave_out_its_category(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_text(QUESTIONS_HEAD, encoding="utf-8")
    assert load_questions(path) == [Question(id="a", question="first?", category=None)]


def _constitution(**changes) -> dict:
    data = json.loads((CONSTITUTIONS / "goodness.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"traits": None}, "missing traits"),
        ({"persona": ""}, "`persona` must be non-empty text"),
        ({"description": 3}, "`description` must be non-empty text"),
        ({"traits": []}, "`traits` must be a non-empty list of text"),
        ({"questions": "why?"}, "`questions` must be a non-empty list of text"),
        ({"questions": ["why?", ""]}, "questions[1] must be non-empty text"),
        ({"examples": []}, "`examples` must be a non-empty list"),
        (
            {"examples": [{"question": "q", "answer": "a"}, {"question": "q"}]},
            "examples[1] must be an object",
        ),
    ],
)
def test_a_bad_constitution_names_the_key_and_its_line(tmp_path, changes, message):
    path = tmp_path / "persona.json"
    text = json.dumps(_constitution(**changes), indent=2)
    path.write_text(text, encoding="utf-8")
    error = stage_error(load_constitution, path)
    assert message in error, error
    key = next(iter(changes))
    if changes[key] is None:
        assert error.startswith(f"{path}: "), error
    else:
        line = text[: text.index(f'"{key}"')].count("\n") + 1
        assert error.startswith(f"{path}:{line}: "), error


def test_a_constitution_that_is_not_json_or_not_an_object(tmp_path):
    path = tmp_path / "persona.json"
    path.write_text('{\n  "persona": "x",\n  oops\n}\n', encoding="utf-8")
    assert stage_error(load_constitution, path).startswith(f"{path}:3: not valid JSON")
    path.write_text("[]", encoding="utf-8")
    assert "one JSON object" in stage_error(load_constitution, path)


# --- property --------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["system", "user", "assistant", "bot", ""]) | _json_values,
            "content": st.text(max_size=8) | _json_values,
        },
    )
    | _json_values,
    max_size=4,
)
_lines = st.one_of(
    st.text(),
    _json_values.map(json.dumps),
    st.builds(lambda messages: json.dumps({"messages": messages}), _messages),
    st.sampled_from(["[" * 5000, "1" * 5000, "\ufeff{}", "NaN", "\x00"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_lines, max_size=5))
def test_load_chat_jsonl_raises_only_stage_errors(tmp_path, lines):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", newline="")
    try:
        conversations = load_chat_jsonl(path)
    except StageError as error:
        assert str(error).startswith(str(path)), str(error)
    else:
        for conversation in conversations:
            assert conversation[-1]["role"] == "assistant"
            assert any(message["role"] == "user" for message in conversation)
