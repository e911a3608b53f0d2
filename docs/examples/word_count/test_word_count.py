"""The word_count kind's own test: one run through the test kit, no spec or store."""

import pytest
from word_count import run as word_count

from harness.api import StageError
from harness.testing import run_kind


def test_counts_words_and_writes_them(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("One two two, three three three.\n")
    result = run_kind(word_count, {"text": str(text), "top": 2}, tmp_path / "out")
    assert result.metrics == {"n_words": 6, "n_distinct": 3}
    assert (result.out_dir / "top.jsonl").read_text().splitlines() == [
        '{"word": "three", "count": 3}',
        '{"word": "two", "count": 2}',
    ]


def test_shares_words_with_the_reference(tmp_path):
    (tmp_path / "a.txt").write_text("red green blue")
    (tmp_path / "b.txt").write_text("red green black white")
    first = run_kind(word_count, {"text": str(tmp_path / "a.txt")}, tmp_path / "a")
    params = {"text": str(tmp_path / "b.txt"), "compare": True}
    second = run_kind(word_count, params, tmp_path / "b", upstream={"reference": first.out_dir})
    assert second.metrics["shared"] == 0.5


def test_a_text_without_words_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("12 34\n")
    with pytest.raises(StageError, match="no word of 1 or more letters"):
        run_kind(word_count, {"text": str(tmp_path / "empty.txt")}, tmp_path / "out")
