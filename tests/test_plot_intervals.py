"""Every plot with error bars or bands says which interval it draws, in a label, legend or title."""

from __future__ import annotations

import numpy as np

from harness.lab.mcq import CATEGORIES
from harness.stages import em_eval, mcq_compare, safety_eval, steer

BOOTSTRAP = "95% bootstrap CI (1,000 resamples of the answers)"


def texts(figure) -> str:
    """Every title, axis label and legend text of a figure, one per line."""
    found = [figure._suptitle.get_text()] if figure._suptitle else []
    for axes in figure.axes:
        found += [axes.get_title(), axes.get_xlabel(), axes.get_ylabel()]
        legend = axes.get_legend()
        if legend:
            found += [legend.get_title().get_text(), *(t.get_text() for t in legend.get_texts())]
    return "\n".join(found)


def rate(value: float) -> dict:
    return {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}


def test_em_rates_say_their_bootstrap_interval(tmp_path):
    results = {"base": {"em_rate": rate(0.2)}, "em": {"em_rate": rate(0.5)}}
    assert BOOTSTRAP in texts(em_eval.plot_em_rates(results, tmp_path / "em.png", "em"))


def test_safety_scores_say_their_bootstrap_interval(tmp_path):
    results = {
        "strongreject": {"base": {"score": rate(0.3)}},
        "xstest": {"base": {"safe": {"refusal_rate": rate(0.2)}}},
    }
    assert BOOTSTRAP in texts(safety_eval.plot_safety(results, tmp_path / "safety.png", "safety"))


def test_the_steering_band_says_what_it_spans(tmp_path):
    random = np.linspace(0.3, 0.7, 40 * 3).reshape(40, 3)
    figure = steer.plot_steering([-1.0, 0.0, 1.0], [0.2, 0.5, 0.8], random, tmp_path / "s.png", "steer")
    assert "40 random directions of the same norm: 5-95%" in texts(figure)


def test_mcq_accuracy_says_its_wilson_interval(tmp_path):
    rows = [{"category": category, "correct_false": True} for category in CATEGORIES]
    assert "95% Wilson CI" in texts(mcq_compare.plot_accuracy(tmp_path / "mcq.png", rows, rows, "mcq"))
