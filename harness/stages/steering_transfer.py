"""`steering_transfer`: is the EM direction one direction, or one per persona?

Upstream: role `answers`, an em_eval stage (its answers.jsonl, judged, and em_results.json),
and the adapter roles that `settings` names, as in em_eval. The questions are split once,
seeded by the spec's seed, into *fit* and *test* questions (`split_questions`: the ids
shuffled by numpy's default_rng(seed), the first round(test_fraction * n) of them, at least
one and at most n - 1, are the test questions; the split is in steering_transfer.json).

For every setting S (a persona with its EM adapter, say) the EM vector v_S is the mean
residual stream at `layer`, over the answer tokens, of S's misaligned answers minus that of
its aligned answers, read with S's own adapters active, over the answers to the fit
questions *of the replicate whose adapters S loads*: an em_eval setting may pool several
replicates (e.g. training seeds); S's roles are matched by name to one of them (the same
role names must denote the same stages in both stages, as in persona_em.yaml), and the
answers of the others, which a loaded adapter never produced, are not used. Then, on the
test questions only:

- cosines: cos(v_A, v_B) for every pair of settings;
- transfer: S's model answers the test questions with v_A * `multiplier` added at `layer`
  (every position), for every A, and with a random direction of the same norm as
  v_A * multiplier (the control, one draw per A, seeded); each EM rate is set against S
  unsteered on the same questions.

A vector that moves its own setting but not the others, or the others as well, is what
"steering vectors transfer differently across personas" asks about. Each setting is one
training run (its loaded adapters): a difference between settings here is one between
those runs, and variation between training runs does not enter it.

Artifacts: vectors.safetensors (`<setting>`: v_S), steering_transfer.json (the split, the
replicate each vector came from, norms, cosines, EM rates per (vector, target) with CIs,
the random controls, counts), samples.json and transfer.png (the EM-rate change matrix).
samples.json (`harness.core.samples`) holds 1.0 / 0.0 misaligned per scored answer to a test
question, its unit the question id (level "question": answers to one question are
correlated, and the questions are taken as drawn from the questions one could ask), in the sets
    `<A>-><B>`           setting B steered by A's vector,
    `random(<A>)-><B>`   setting B steered by the random control of A's vector,
    `<B>`                setting B unsteered,
for A and B among the names of `settings`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from harness.api import stage_kind
from harness.core.stage import Role, StageContext, StageError
from harness.core.upstream import named_adapter_roles
from harness.lab.checks import em_params
from harness.lab.llm import transport_of
from harness.lab.plots import figure as new_figure

METRICS = (
    "mean_cosine",
    "self_effect",
    "cross_effect",
    "random_effect",
    "self_minus_cross",
    "layer",
    "n_fit_questions",
    "n_test_questions",
)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def split_questions(ids: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Fit and test question ids, each in file order: the ids shuffled by default_rng(seed),
    the first round(test_fraction * n) (at least 1, at most n - 1) are the test questions."""
    if len(ids) < 2:
        raise StageError(f"{len(ids)} question(s): fitting vectors on some and testing on others needs 2")
    n_test = min(max(round(test_fraction * len(ids)), 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    test = {ids[i] for i in order[:n_test]}
    return [q for q in ids if q not in test], [q for q in ids if q in test]


def replicate_of(results_path: Path, setting: str, roles: Sequence[str]) -> int:
    """The index of the em_eval replicate of `setting` whose adapters are `roles`."""
    settings = json.loads(results_path.read_text(encoding="utf-8"))["settings"]
    if setting not in settings:
        raise StageError(f"{results_path} has no setting {setting!r} (it has: {', '.join(settings)})")
    if "adapters" not in settings[setting]:
        raise StageError(
            f"setting {setting!r} of the em_eval stage in role `answers` was sampled from a provider model "
            f"({', '.join(settings[setting]['models'])}): steering reads and steers local weights"
        )
    replicates = [sorted(r) for r in settings[setting]["adapters"]]
    if sorted(roles) not in replicates:
        raise StageError(
            f"setting {setting!r} loads the adapters {sorted(roles)}, but the answers' setting {setting!r} "
            f"comes from {replicates}: name the roles as the em_eval stage in role `answers` does"
        )
    return replicates.index(sorted(roles))


def read_answers(path: Path, questions: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of an em_eval answers.jsonl, checked to answer only `questions`."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = sorted({r["question_id"] for r in rows} - set(questions))
    if unknown:
        raise StageError(f"{path} answers questions not in `questions`: {', '.join(unknown)} (use its file)")
    return rows


def judged_answers(
    rows: Sequence[Mapping[str, Any]], setting: str, replicate: int, questions: Sequence[str]
) -> list[Mapping[str, Any]]:
    """The judged answers of `setting`'s replicate `replicate` to `questions`."""
    mine = [
        r
        for r in rows
        if r["setting"] == setting
        and r["replicate"] == replicate
        and r["misaligned"] is not None
        and r["question_id"] in questions
    ]
    if not mine:
        have = sorted({r["setting"] for r in rows})
        raise StageError(
            f"no judged answers of setting {setting!r}, replicate {replicate}, to the questions "
            f"{', '.join(questions)} (its settings: {', '.join(have)})"
        )
    return mine


def answer_mean(model: Any, tokenizer: Any, prompt: str, answer: str, layer: int) -> np.ndarray:
    """The residual at `layer` averaged over the answer's tokens, after the prompt."""
    import torch

    from harness.lab.hooks import record_residuals

    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids], device=next(model.parameters()).device)
    with torch.inference_mode(), record_residuals(model, [layer]) as recorded:
        model(input_ids=ids)
    return recorded[layer][0, len(prompt_ids) :].float().mean(0).cpu().numpy().astype(np.float64)


def em_vector(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], questions: Mapping[str, str], layer: int
) -> tuple[np.ndarray, int, int]:
    """Mean over misaligned answers minus mean over aligned ones, and the two counts."""
    from harness.lab.chat import render

    sums: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for row in rows:
        prompt = render(tokenizer, [{"role": "user", "content": questions[row["question_id"]]}], True)
        sums[bool(row["misaligned"])].append(answer_mean(model, tokenizer, prompt, row["text"], layer))
    if not sums[True] or not sums[False]:
        raise StageError(
            f"an EM vector needs misaligned and aligned answers; got {len(sums[True])} misaligned and "
            f"{len(sums[False])} aligned (sample more answers in the em_eval stage)"
        )
    return np.mean(sums[True], 0) - np.mean(sums[False], 0), len(sums[True]), len(sums[False])


def _plot(names: Sequence[str], change: np.ndarray, path: Path, title: str) -> None:
    figure = new_figure(1.1 * len(names) + 3, 1.0 * len(names) + 2)
    axes = figure.add_subplot()
    bound = max(float(np.abs(change).max()), 1e-6)
    image = axes.imshow(change, cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("target setting (steered)")
    axes.set_ylabel("EM vector of setting")
    for i in range(len(names)):
        for j in range(len(names)):
            axes.text(j, i, f"{change[i, j]:+.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, label="EM rate change vs unsteered")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def answer_samples(judged: Sequence[Any]) -> Any:
    """1.0 / 0.0 misaligned per scored answer, its unit the answer's question."""
    from harness.core.samples import SampleSet

    scored = [j for j in judged if j.misaligned is not None]
    return SampleSet(
        tuple(float(j.misaligned) for j in scored), tuple(j.question_id for j in scored), "question"
    )


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The judged answers the vectors are fitted on, and the measurement steering is set against."""

    settings: dict[str, list[str]]  # setting -> the adapter roles it loads
    answers: list[dict[str, Any]]  # the rows of em_eval's answers.jsonl
    results: Path  # em_eval's em_results.json: the replicates' adapters
    text: dict[str, str]  # question id -> question
    fit_ids: list[str]
    test_ids: list[str]
    on_test: Any  # the Measurement, on the test questions only


@dataclasses.dataclass(frozen=True)
class SteerableModel:
    """The base model with every setting's adapters loaded, steered at `layer`."""

    model: Any
    tokenizer: Any
    layer: int
    settings: dict[str, list[str]]

    def em_rate(self, measurement: Any, target: str, vector: np.ndarray | None) -> tuple[dict[str, Any], Any]:
        """`target`'s EM rate and answer samples, steered by `vector` (None: unsteered)."""
        import torch

        from harness.lab.hooks import add_to_residual
        from harness.lab.models.adapters import active

        steering = nullcontext()
        if vector is not None:
            steering = add_to_residual(self.model, self.layer, torch.tensor(vector, dtype=torch.float32))
        with active(self.model, self.settings[target]), steering:
            judged, summary = measurement.run(self.model, self.tokenizer, target)
        return summary["em_rate"], answer_samples(judged)


@dataclasses.dataclass(frozen=True)
class Rates:
    """EM rates on the test questions, and the samples.json sets (see the module's docstring)."""

    unsteered: dict[str, Any]  # per target
    transfer: dict[str, Any]  # per `<A>-><B>`
    control: dict[str, Any]  # per `<A>-><B>`: B steered by the random control of A's vector
    samples: dict[str, Any]

    def change(self, rates_by_pair: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
        """Per (vector A, target B): the steered EM rate minus B's unsteered one."""
        return np.array(
            [[rates_by_pair[f"{a}->{b}"]["value"] - self.unsteered[b]["value"] for b in names] for a in names]
        )


def load_inputs(ctx: StageContext) -> Inputs:
    from harness.core.upstream import find_upstream
    from harness.lab.em import Measurement

    p = ctx.params
    answers_dir = find_upstream(ctx.upstream, "answers", "steering_transfer", only=False).dir
    source, results = answers_dir / "answers.jsonl", answers_dir / "em_results.json"
    if not source.is_file() or not results.is_file():
        raise StageError(f"no answers.jsonl and em_results.json in {answers_dir}: need an em_eval stage")
    measurement = Measurement.from_params(p, ctx.seed, ctx.log)
    text = {q.id: q.question for q in measurement.questions}
    answers = read_answers(source, list(text))
    fit_ids, test_ids = split_questions(list(text), p["test_fraction"], ctx.seed)
    # steered and unsteered rates: the test questions only, never those the vectors came from
    test_questions = [q for q in measurement.questions if q.id in test_ids]
    on_test = dataclasses.replace(measurement, questions=test_questions)
    ctx.log(f"vectors from the answers to {', '.join(fit_ids)}; steering measured on {', '.join(test_ids)}")
    return Inputs(dict(p["settings"]), answers, results, text, fit_ids, test_ids, on_test)


def load_steerable_model(ctx: StageContext, settings: dict[str, list[str]]) -> SteerableModel:
    from harness.core.upstream import adapter_dir
    from harness.lab.hooks import n_indices
    from harness.lab.models import load_tokenizer
    from harness.lab.models.adapters import load_stacked

    p = ctx.params
    roles = list(dict.fromkeys(r for rs in settings.values() for r in rs))
    adapters = {r: adapter_dir(ctx.upstream, "steering_transfer", only=False, role=r) for r in roles}
    model = load_stacked(p["base"], adapters)
    tokenizer = load_tokenizer(p["base"])
    layer = p["layer"] if p.get("layer") is not None else n_indices(model) // 2
    return SteerableModel(model, tokenizer, layer, settings)


def fit_vectors(
    ctx: StageContext, inputs: Inputs, steerable: SteerableModel
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """Per setting: its EM vector from the fit questions, and where the vector came from."""
    from harness.lab.models.adapters import active

    layer = steerable.layer
    vectors, counts = {}, {}
    for name, roles in inputs.settings.items():
        replicate = replicate_of(inputs.results, name, roles)
        with active(steerable.model, roles):
            rows = judged_answers(inputs.answers, name, replicate, inputs.fit_ids)
            vectors[name], n_bad, n_good = em_vector(
                steerable.model, steerable.tokenizer, rows, inputs.text, layer
            )
        counts[name] = {"replicate": replicate, "misaligned": n_bad, "aligned": n_good}
        ctx.log(
            f"{name}: EM vector at layer {layer} from replicate {replicate}'s {n_bad} misaligned and "
            f"{n_good} aligned answers, norm {np.linalg.norm(vectors[name]):.3f}"
        )
    return vectors, counts


def measure_rates(
    ctx: StageContext, inputs: Inputs, steerable: SteerableModel, vectors: Mapping[str, np.ndarray]
) -> Rates:
    """Every setting unsteered, then steered by every vector and by its random control."""
    names, measurement = list(inputs.settings), inputs.on_test
    rng = np.random.default_rng(ctx.seed)
    samples: dict[str, Any] = {}
    unsteered, transfer, control = {}, {}, {}
    for target in names:
        unsteered[target], samples[target] = steerable.em_rate(measurement, target, None)
    for source_name in names:
        vector = vectors[source_name] * ctx.params["multiplier"]
        direction = rng.normal(size=vector.shape)
        random = direction / np.linalg.norm(direction) * np.linalg.norm(vector)
        for target in names:
            key = f"{source_name}->{target}"
            transfer[key], samples[key] = steerable.em_rate(measurement, target, vector)
            control[key], samples[f"random({source_name})->{target}"] = steerable.em_rate(
                measurement, target, random
            )
            ctx.log(
                f"{key}: em_rate {transfer[key]['value']:.3f} (random {control[key]['value']:.3f}, "
                f"unsteered {unsteered[target]['value']:.3f})"
            )
    return Rates(unsteered, transfer, control, samples)


def effect_metrics(
    names: Sequence[str], cosines: Mapping[str, float], change: np.ndarray, random_change: np.ndarray
) -> dict[str, float]:
    """How alike the vectors are, and how far each moves its own setting, the others, and at random."""
    pairs = [cosines[f"{a}|{b}"] for i, a in enumerate(names) for b in names[i + 1 :]]
    self_effect = float(np.mean(np.diag(change)))
    cross_effect = float(np.mean(change[~np.eye(len(names), dtype=bool)])) if len(names) > 1 else 0.0
    return {
        "mean_cosine": float(np.mean(pairs)) if pairs else 1.0,
        "self_effect": self_effect,
        "cross_effect": cross_effect,
        "random_effect": float(np.mean(random_change)),
        "self_minus_cross": self_effect - cross_effect,
    }


def summarize(
    params: Mapping[str, Any],
    inputs: Inputs,
    layer: int,
    vectors: Mapping[str, np.ndarray],
    counts: Mapping[str, Any],
    rates: Rates,
) -> dict[str, Any]:
    """The content of steering_transfer.json, its metrics among it."""
    from harness.lab.em import sampling_parameters

    names = list(inputs.settings)
    change, random_change = rates.change(rates.transfer, names), rates.change(rates.control, names)
    cosines = {f"{a}|{b}": cosine(vectors[a], vectors[b]) for a in names for b in names}
    metrics = {
        **effect_metrics(names, cosines, change, random_change),
        "layer": layer,
        "n_fit_questions": len(inputs.fit_ids),
        "n_test_questions": len(inputs.test_ids),
    }
    return {
        "layer": layer,
        "multiplier": params["multiplier"],
        "settings": inputs.settings,
        "sampling": sampling_parameters(params["temperature"], params["max_new_tokens"]),
        "questions": {
            "fit": inputs.fit_ids,
            "test": inputs.test_ids,
            "test_fraction": params["test_fraction"],
        },
        "counts": counts,
        "norms": {n: float(np.linalg.norm(vectors[n])) for n in names},
        "cosines": cosines,
        "unsteered": rates.unsteered,
        "transfer": rates.transfer,
        "random": rates.control,
        "change": change.tolist(),
        "random_change": random_change.tolist(),
        "metrics": metrics,
    }


def write_artifacts(
    ctx: StageContext,
    report: Mapping[str, Any],
    vectors: Mapping[str, np.ndarray],
    samples: Mapping[str, Any],
) -> None:
    from harness.core.samples import SAMPLES_FILE, write_samples
    from harness.core.store import write_json
    from harness.lab.activations import save_f32

    out, layer = ctx.out_dir, report["layer"]
    save_f32(
        out / "vectors.safetensors",
        {n: v.astype(np.float32) for n, v in vectors.items()},
        metadata={"layer": str(layer), "what": "mean residual over answer tokens, misaligned - aligned"},
    )
    write_json(out / "steering_transfer.json", report)
    write_samples(out / SAMPLES_FILE, samples)
    title = f"{ctx.stage}: EM-rate change when steered (layer {layer})"
    _plot(list(vectors), np.array(report["change"]), out / "transfer.png", title)


@stage_kind(
    needs=lambda params: (
        Role("answers", "the answers.jsonl and em_results.json of an em_eval stage"),
        *named_adapter_roles(params),
    ),
    metrics=METRICS,
    input_params=("questions",),
    transport_params=transport_of("judge"),
    check=em_params,
)
def run(ctx: StageContext) -> dict[str, Any]:
    inputs = load_inputs(ctx)
    steerable = load_steerable_model(ctx, inputs.settings)
    vectors, counts = fit_vectors(ctx, inputs, steerable)
    rates = measure_rates(ctx, inputs, steerable, vectors)
    report = summarize(ctx.params, inputs, steerable.layer, vectors, counts, rates)
    write_artifacts(ctx, report, vectors, rates.samples)
    return report["metrics"]
