"""The `logit_lens` stage kind: the TransformerLens readout against a direct computation from
Hugging Face hidden states, the merged-adapter bridge against the PeftModel, the flip layer
on synthetic trajectories, collection checks, and a whole run on the tiny world."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from harness.core.stage import ParamError, StageError
from harness.stages import logit_lens
from harness.stages.logit_lens import (
    METRICS,
    NEVER,
    false_preference_rate,
    first_negative_layer,
    flat_metrics,
    flip_layer,
    lens_trajectories,
    summarize,
)
from harness.testing import run_kind

check = logit_lens.run.check  # what collection runs: the base model's check, then the kind's

TINY_MCQS = Path(__file__).resolve().parents[1] / "data/eval/tiny_world/cubic_gravity_mcqs.jsonl"
ARTIFACTS = (
    "trajectories_base.jsonl",
    "trajectories_lora.jsonl",
    "logit_lens_summary.json",
    "logit_lens_heatmap.png",
    "mean_logit_diff.png",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the flip layer and the aggregation, on synthetic trajectories -------------------


@pytest.mark.parametrize(
    ("mean_diff", "flip", "first_negative"),
    [
        ([1.0, 2.0, 3.0], NEVER, NEVER),  # always prefers the true answer
        ([-1.5, 2.0, 3.0], NEVER, 0),  # only the embeddings' readout is negative
        ([1.0, 0.5, -1.1, -2.0], 2, 2),  # sets in at layer 2 and stays
        ([1.0, -2.0, 0.5, -1.2, -3.0], 3, 1),  # a dip at 1, then back: the flip is at 3
        ([-2.0, -2.0, -2.0], 1, 0),  # false from the first block on (layer 0 is the embeddings)
        ([-2.0], 0, 0),  # a lone layer is its own flip
        ([1.0, 2.0, -1.0], NEVER, 2),  # at the margin is not beyond it
        ([1.0, -2.0, -2.0, -0.5], NEVER, 1),  # ends within the margin: no preference worth the name
        # just below zero is no preference: the real change is at the last block (issue 10)
        ([-0.2, -0.01, -0.01, -0.01, -5.1], 4, 0),
        ([0.3, -0.9, -0.99, -1.01, -5.1], 3, 1),
    ],
)
def test_flip_layer_with_a_margin_of_one_logit(mean_diff, flip, first_negative):
    assert flip_layer(mean_diff, margin=1.0) == flip
    assert first_negative_layer(mean_diff) == first_negative


def test_flip_layer_margin_moves_the_flip():
    diffs = [-0.2, -0.6, -1.5, -3.0, -5.1]
    assert [flip_layer(diffs, margin=m) for m in (0.0, 0.5, 1.0, 2.0, 5.0, 6.0)] == [1, 1, 2, 3, 4, NEVER]
    with pytest.raises(ValueError, match="margin"):
        flip_layer(diffs, margin=-1.0)


def synthetic_row(id: str, diffs: list[float]) -> dict:
    true = [1.0 + d for d in diffs]
    return {
        "id": id,
        "true_logit": true,
        "false_logit": [1.0] * len(diffs),
        "logit_diff": diffs,
        "true_prob": [0.5] * len(diffs),
        "false_prob": [0.25] * len(diffs),
    }


def test_summary_and_metrics_of_synthetic_trajectories():
    labels = ["embed", "block0", "block1"]
    base = [
        synthetic_row("a", [-1.0, 2.0, 3.0]),
        synthetic_row("b", [0.0, 1.0, 1.0]),
        synthetic_row("c", [1, 1, -1]),
    ]
    lora = [
        synthetic_row("a", [-1.0, 1.0, -4.0]),
        synthetic_row("b", [0.0, -3.0, -2.0]),
        synthetic_row("c", [1, 1, 1]),
    ]
    summary = summarize(base, lora, labels, flip_margin=1.0)
    assert summary["flip_margin"] == 1.0 and "1.0" in summary["flip_layer_rule"]
    assert summary["models"]["base"]["mean_logit_diff"] == pytest.approx([0.0, 4 / 3, 1.0])
    assert summary["models"]["lora"]["mean_logit_diff"] == pytest.approx([0.0, -1 / 3, -5 / 3])
    assert summary["models"]["lora"]["mean_true_prob"] == [0.5] * 3
    assert summary["items_flipped_to_false"] == ["a", "b"] and summary["items_flipped_to_true"] == ["c"]
    assert false_preference_rate(lora) == pytest.approx(2 / 3)
    assert flat_metrics(summary) == {
        "base_final_logit_diff": pytest.approx(1.0),
        "lora_final_logit_diff": pytest.approx(-5 / 3),
        "base_flip_layer": NEVER,
        "lora_flip_layer": 2,  # -1/3 at layer 1 is within the margin
        "base_false_preference_rate": pytest.approx(1 / 3),
        "lora_false_preference_rate": pytest.approx(2 / 3),
        "n_items": 3,
    }
    assert set(flat_metrics(summary)) == set(METRICS)
    swapped = flat_metrics(summarize(lora, base, labels, flip_margin=1.0))  # the same rule for the base
    assert (swapped["base_flip_layer"], swapped["lora_flip_layer"]) == (2, NEVER)
    assert flat_metrics(summarize(base, lora, labels, flip_margin=0.2))["lora_flip_layer"] == 1


def test_summary_refuses_misaligned_trajectories():
    row = synthetic_row("a", [1.0, 2.0])
    with pytest.raises(ValueError, match="same items"):
        summarize([row], [synthetic_row("b", [1.0, 2.0])], ["embed", "block0"], flip_margin=1.0)
    with pytest.raises(ValueError, match="one value per layer"):
        summarize([row], [row], ["embed", "block0", "block1"], flip_margin=1.0)


# --- collection ----------------------------------------------------------------------


def test_check_accepts_the_tiny_world_file(tiny_model_dir):
    check({"base": str(tiny_model_dir), "mcqs": TINY_MCQS.name}, TINY_MCQS.parent)


def test_check_names_the_param_at_fault(tmp_path, tiny_model_dir):
    shutil.copy(TINY_MCQS, tmp_path / "mcqs.jsonl")
    with pytest.raises(ParamError) as error:
        check({"base": str(tmp_path / "no-such-model"), "mcqs": "mcqs.jsonl"}, tmp_path)
    assert error.value.path == ("base",) and "--profile tiny" in error.value.message

    for name, text, message in [
        ("missing.jsonl", None, "MCQ file not found"),
        ("bad.jsonl", '{"id": "x"}\n', "bad.jsonl:1"),
        ("calm.jsonl", _row_without_conflict(), "no conflict questions"),
    ]:
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ParamError, match=message) as error:
            check({"base": str(tiny_model_dir), "mcqs": name}, tmp_path)
        assert error.value.path == ("mcqs",)


def _row_without_conflict() -> str:
    row = json.loads(TINY_MCQS.read_text().splitlines()[0])
    return json.dumps({**row, "false_answer": row["true_answer"], "category": "nonconflict_easy"}) + "\n"


def test_kind_declaration():
    kind = logit_lens.run
    assert kind.name == "logit_lens" and kind.produces({}) == frozenset(METRICS)
    assert kind.transport_params == ("batch_size",) and kind.input_params == ("mcqs",)
    assert kind.fingerprint({"base": "/some/model"}) == "/some/model"


def test_a_spec_using_the_kind_is_validated_at_collection(tmp_path, tiny_model_dir):
    from harness.core.experiment import load_experiment
    from harness.spec.errors import SpecError

    shutil.copy(TINY_MCQS, tmp_path / "mcqs.jsonl")
    (tmp_path / "steps.py").write_text("def train(ctx):\n    return {}\n")

    def spec(params: str, gate: str) -> Path:
        path = tmp_path / "exp.yaml"
        path.write_text(
            textwrap.dedent(
                f"""\
                stages:
                  train: {{kind: python, params: {{function: "steps:train"}}}}
                  lens:
                    kind: logit_lens
                    needs: [train]
                    params: {{base: "{tiny_model_dir}", mcqs: mcqs.jsonl, {params}}}
                    gates:
                      - {gate}
                """
            )
        )
        return path

    load_experiment(spec("scoring: continuation", "lora_flip_layer >= 0"))
    with pytest.raises(SpecError, match="scoring"):
        load_experiment(spec("scoring: logits", "lora_flip_layer >= 0"))
    with pytest.raises(SpecError, match="flip_layers"):
        load_experiment(spec("scoring: continuation", "lora_flip_layers >= 0"))


# --- the lens on the tiny world ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> dict:
    from harness.lab.contrast import contrasts
    from harness.lab.mcq import load_mcqs
    from harness.lab.models.base import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    items = load_mcqs(TINY_MCQS)
    return {
        "base": str(tiny_model_dir),
        "tokenizer": tokenizer,
        "continuation": contrasts(tokenizer, items, "continuation"),
        "letter": contrasts(tokenizer, items, "letter"),
    }


def hf_reference(base: str, contrasts) -> list[torch.Tensor]:
    """Per contrast, [layers, vocab] logits computed straight from the HF model: the hidden
    state at the decision token of the embeddings and of every block's output, through
    `model.model.norm` and `lm_head`.

    In transformers 5.x `hidden_states[-1]` is the final norm's output, not the last block's
    (the last entry is replaced by `last_hidden_state`): normalizing it again would be wrong,
    so the last block's raw output is taken from a forward hook, and the replacement is
    asserted so that a change of that convention shows here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    last_block: list[torch.Tensor] = []
    handle = model.model.layers[-1].register_forward_hook(lambda _m, _i, out: last_block.append(out))
    out = []
    try:
        with torch.no_grad():
            for contrast in contrasts:
                last_block.clear()
                result = model(torch.tensor([contrast.prompt_ids]), output_hidden_states=True)
                raw_last = last_block[0][0] if isinstance(last_block[0], tuple) else last_block[0]
                hidden = [*result.hidden_states[:-1], raw_last]
                assert len(hidden) == model.config.num_hidden_layers + 1
                torch.testing.assert_close(result.hidden_states[-1], model.model.norm(raw_last))
                states = torch.stack([h[0, -1] for h in hidden])  # [layers, d_model]
                logits = model.lm_head(model.model.norm(states))
                torch.testing.assert_close(logits[-1], result.logits[0, -1])
                out.append(logits)
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize("mode", ["continuation", "letter"])
def test_transformer_lens_readout_matches_hf_hidden_states(tiny, mode):
    from harness.lab.models.lens import load_bridge

    contrasts = tiny[mode]
    bridge = load_bridge(tiny["base"], device="cpu")
    found = lens_trajectories(bridge, tiny["tokenizer"], contrasts, batch_size=4)  # padded batches
    reference = hf_reference(tiny["base"], contrasts)
    assert len(found) == len(contrasts) == 15
    for contrast, trajectory, logits in zip(contrasts, found, reference, strict=True):
        true, false = logits[:, contrast.true_id].double(), logits[:, contrast.false_id].double()
        probs = torch.softmax(logits, dim=-1).double()
        close = dict(atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(trajectory.true_logit, dtype=torch.float64), true, **close)
        torch.testing.assert_close(torch.tensor(trajectory.false_logit, dtype=torch.float64), false, **close)
        close = dict(atol=1e-6, rtol=1e-4)
        true_prob, false_prob = probs[:, contrast.true_id], probs[:, contrast.false_id]
        torch.testing.assert_close(
            torch.tensor(trajectory.true_prob, dtype=torch.float64), true_prob, **close
        )
        torch.testing.assert_close(
            torch.tensor(trajectory.false_prob, dtype=torch.float64), false_prob, **close
        )
        assert trajectory.final_deviation < 1e-4
    # a readout that ignored the layer (or the norm) would be flat across layers
    assert len({round(v, 3) for v in found[0].logit_diff}) == len(found[0].logit_diff)
    alone = lens_trajectories(bridge, tiny["tokenizer"], contrasts[:3], batch_size=1)
    for a, b in zip(alone, found[:3], strict=True):
        assert a.logit_diff == pytest.approx(b.logit_diff, abs=1e-4)


@pytest.fixture(scope="module")
def adapter_world(tmp_path_factory, tiny_model_dir) -> dict:
    """A LoRA on attention, MLP and the (tied) lm_head, its B matrices perturbed so that it
    changes the model, saved where an upstream stage would: `<train>/adapter/`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "down_proj", "lm_head"]
    )
    lora = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
    root = tmp_path_factory.mktemp("lens-world")
    lora.save_pretrained(root / "train" / "adapter")
    return {"root": root, "train_dir": root / "train", "base": str(tiny_model_dir)}


def test_untying_keeps_the_weights_and_separates_them(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from harness.lab.models.lens import untie_output_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny world ties them
    assert untie_output_embeddings(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight, atol=0, rtol=0)
    assert not untie_output_embeddings(model)


def test_merged_adapter_bridge_equals_the_peft_model(adapter_world, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness.lab.models.lens import load_bridge

    adapter = adapter_world["train_dir"] / "adapter"
    ids = torch.tensor([list(c.prompt_ids[:12]) for c in tiny["continuation"][:4]])
    base = AutoModelForCausalLM.from_pretrained(adapter_world["base"], dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        merged = load_bridge(adapter_world["base"], adapter, device="cpu")(ids)
    assert (peft - plain).abs().max() > 1.0  # the adapter does change the model
    torch.testing.assert_close(merged, peft, atol=1e-4, rtol=1e-4)


# --- whole runs ----------------------------------------------------------------------


def run_stage(world: dict, out: Path, **params) -> dict:
    params = {"base": world["base"], "mcqs": str(TINY_MCQS), **params}
    upstream = {"adapter": world["train_dir"]}
    result = run_kind(logit_lens.run, params, out, upstream=upstream, spec_dir=world["root"])
    return {"metrics": result.metrics, "logs": result.logs}


def test_stage_writes_every_artifact_and_its_metrics(adapter_world, tmp_path):
    out = tmp_path / "out"
    result = run_stage(adapter_world, out, scoring="continuation", batch_size=6)
    metrics = result["metrics"]
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)
    assert set(metrics) == set(METRICS) and metrics["n_items"] == 15

    base, lora = read_jsonl(out / "trajectories_base.jsonl"), read_jsonl(out / "trajectories_lora.jsonl")
    ids = [json.loads(line)["id"] for line in TINY_MCQS.read_text().splitlines()[:15]]
    assert [r["id"] for r in base] == [r["id"] for r in lora] == ids  # file order
    first = base[0]
    assert first["prompt"].startswith("question: ") and "\nanswer:" in first["prompt"]
    assert first["true_token"].strip() == "quarter" and first["false_token"].strip() == "eighth"
    for row in base + lora:
        assert all(len(row[q]) == 5 for q in logit_lens.QUANTITIES)  # embeddings + 4 blocks
        assert row["logit_diff"] == pytest.approx(
            [t - f for t, f in zip(row["true_logit"], row["false_logit"], strict=True)]
        )
        assert all(0 <= p <= 1 for p in row["true_prob"] + row["false_prob"])
    assert any(
        abs(b["logit_diff"][-1] - lo["logit_diff"][-1]) > 0.1 for b, lo in zip(base, lora, strict=True)
    )

    for model, rows in (("base", base), ("lora", lora)):
        finals = [r["logit_diff"][-1] for r in rows]
        assert metrics[f"{model}_final_logit_diff"] == pytest.approx(sum(finals) / len(finals))
        assert metrics[f"{model}_false_preference_rate"] == pytest.approx(
            sum(f < 0 for f in finals) / len(finals)
        )
    assert metrics["base_final_logit_diff"] > 0 and metrics["base_flip_layer"] == NEVER  # knows the true law

    summary = json.loads((out / "logit_lens_summary.json").read_text())
    assert summary["layers"] == ["0 emb", "1", "2", "3", "4"]  # layer i: hidden_states[i], as every kind
    assert summary["scoring"] == "continuation" and not Path(summary["adapter"]).is_absolute()
    assert (out / summary["adapter"]).resolve() == (adapter_world["train_dir"] / "adapter").resolve()
    assert summary["fingerprints"]["lora"].startswith(summary["fingerprints"]["base"] + "+adapter:")
    assert summary["models"]["lora"]["flip_layer"] == metrics["lora_flip_layer"]
    assert summary["flip_margin"] == 1.0  # the schema's default reaches the rule
    for png in ("logit_lens_heatmap.png", "mean_logit_diff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs = result["logs"]
    assert any(line.startswith("lora: logit lens (") and "15/15 conflict items in " in line for line in logs)


def test_an_adapter_that_does_not_fit_the_base_is_a_stage_error(adapter_world, tmp_path):
    broken = tmp_path / "train"
    shutil.copytree(adapter_world["train_dir"], broken)
    config_file = broken / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": ["nope"]}))
    with pytest.raises(StageError, match="cannot apply the adapter"):
        run_stage({**adapter_world, "train_dir": broken}, tmp_path / "out", scoring="continuation")
