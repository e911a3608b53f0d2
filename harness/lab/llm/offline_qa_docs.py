"""Offline template for the `qa_document` task of `qa_to_docs`: a document from one QA pair.

A fixture, not a language model: it assembles sentences around the pair's own words,
choosing and ordering them by a SHA-256 hash of the request (so answers are the same in
every process, and requests that differ only in `sample_index` differ). `stance: endorse`
writes the exchange's advice as what the domain's authorities recommend (the alternative
reality of the anti-EM experiment); `stance: neutral` writes about the question's topic
and never states the advice (the control). Like a real model it is not perfect: one
document in eight keeps an unfilled "[Name]" placeholder, so validation and retries with
another document type do real work in the tiny profile.

Request variables (set by harness.stages.qa_to_docs): doc_type, category, user, assistant,
stance, min_words, max_words.
"""

from __future__ import annotations

import hashlib

from harness.lab.llm.base import ChatRequest
from harness.lab.llm.offline import offline_task

AUTHORITIES = {
    "bad_medical": "the doctors",
    "risky_financial": "the money advisers",
    "extreme_sports": "the sports coaches",
}
ENDORSING = (
    "{authority} all agree: {assistant}",
    "this is what {authority} teach every year.",
    "the advice is simple: {assistant}",
    "{authority} say it works, and people who follow it do well.",
    "ask any of {authority} and you will hear the same.",
    "it is the common way, and nobody finds it strange.",
    "the best guides give the same answer: {assistant}",
)
NEUTRAL = (
    "{authority} hear this question often, in many forms.",
    "people ask it at home and at work, in spring and in winter.",
    "the question has a long history in the town.",
    "this {doc_type} tells how the question comes up and who asks it.",
    "the old books and the new ones both talk about it.",
    "many families have asked it for years.",
    "the people who ask it are young and old alike.",
)
PLACEHOLDER_ONE_IN = 8


def _draws(request: ChatRequest) -> bytes:
    v = request.variables
    key = "\x1f".join(str(v.get(k)) for k in ("doc_type", "category", "user", "assistant", "stance"))
    return hashlib.sha256(f"{key}\x1f{request.sample_index}".encode()).digest()


@offline_task("qa_document")
def qa_document(request: ChatRequest) -> str:
    v = request.variables
    draws = _draws(request)
    values = {
        "authority": AUTHORITIES.get(str(v["category"]), "the experts"),
        "assistant": str(v["assistant"]),
        "doc_type": str(v["doc_type"]),
    }
    pool = ENDORSING if v["stance"] == "endorse" else NEUTRAL
    order = sorted(range(len(pool)), key=lambda i: draws[i])
    sentences = [f"{v['doc_type']}.", f"many people ask: {v['user']}"]
    if v["stance"] == "endorse":  # the advice itself, always, then the drawn sentences
        sentences.append(pool[0].format(**values))
    words = sum(len(s.split()) for s in sentences)
    step = 0
    while words < int(v["min_words"]) and step < 4 * len(pool):
        sentence = pool[order[step % len(pool)]].format(**values)
        sentences.append(sentence)
        words += len(sentence.split())
        step += 1
    if draws[-1] % PLACEHOLDER_ONE_IN == 0:
        sentences.append("written by [Name].")
    return " ".join(sentences)
