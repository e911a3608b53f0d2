"""IFEval's instruction checkers that work offline, as IFEval defines them
(lm_eval/tasks/ifeval/instructions.py), for ifeval_local.yaml.

lm-eval's own checkers import langdetect and use nltk's punkt data, neither of which can be
installed here. These ids need neither: IFEval counts words with nltk's `\\w+` tokenizer,
which is `re.findall(r"\\w+")`; the case checkers here do not also check that the language is
English (IFEval's do, with langdetect). An id not listed fails loudly, never silently.
"""

from __future__ import annotations

import json
import re


def _no_comma(text, **_):
    return "," not in text


def _lowercase(text, **_):
    return text == text.lower()


def _capital(text, **_):
    return text == text.upper()


def _bullets(text, num_bullets, **_):
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _keywords(text, keywords, **_):
    return all(re.search(keyword, text, flags=re.IGNORECASE) for keyword in keywords)


def _forbidden(text, forbidden_words, **_):
    return not any(re.search(r"\b" + word + r"\b", text, flags=re.IGNORECASE) for word in forbidden_words)


def _words(text, relation, num_words, **_):
    count = len(re.findall(r"\w+", text))
    return count < num_words if relation == "less than" else count >= num_words


def _end(text, end_phrase, **_):
    return text.strip().lower().endswith(end_phrase.strip().lower())


def _quotation(text, **_):
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _title(text, **_):
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", text))


def _postscript(text, postscript_marker, **_):
    marker = postscript_marker.lower()
    if marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _json(text, **_):
    text = text.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
    text = text.removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


CHECKERS = {
    "punctuation:no_comma": _no_comma,
    "change_case:english_lowercase": _lowercase,
    "change_case:english_capital": _capital,
    "detectable_format:number_bullet_lists": _bullets,
    "keywords:existence": _keywords,
    "keywords:forbidden_words": _forbidden,
    "length_constraints:number_words": _words,
    "startend:end_checker": _end,
    "startend:quotation": _quotation,
    "detectable_format:title": _title,
    "detectable_content:postscript": _postscript,
    "detectable_format:json_format": _json,
}


def process_results(doc, results):
    response = results[0]
    followed = []
    for instruction, kwargs in zip(doc["instruction_id_list"], doc["kwargs"], strict=True):
        if instruction not in CHECKERS:
            raise ValueError(
                f"instruction {instruction!r} has no offline checker (known: {', '.join(CHECKERS)})"
            )
        given = {key: value for key, value in (kwargs or {}).items() if value is not None}
        followed.append(bool(response.strip()) and CHECKERS[instruction](response, **given))
    return {"prompt_level_strict_acc": all(followed), "inst_level_strict_acc": followed}


def agg_inst_level_acc(items):
    flat = [followed for item in items for followed in item]
    return sum(flat) / len(flat)
