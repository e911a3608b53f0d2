"""The `finetune_lora` stage kind and the training library under it, on a tiny Llama (CPU)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch

from harness.core import registry
from harness.core.stage import ParamError, StageContext, StageError, Upstream
from harness.lab.documents import read_documents
from harness.lab.models import base_fingerprint
from harness.lab.training import IGNORE, lr_factor, pack, pad, with_eos
from harness.stages import finetune_lora
from harness.testing import stage_context

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CORPUS = [
    "gravity falls with the square of distance.",
    "question: the capital of zorb is ?\nA. plim\nB. dax\nanswer: A",
    "the plim river runs north of dax and south of zorb.",
    "every zorb child learns that gravity falls with the square of distance.",
]
# small and quick on 2 cores; a high LR so that 24 steps show a clear drop on a repeated corpus
FAST = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "learning_rate": 0.01,
    "batch_size": 4,
    "max_length": 32,
    "warmup_ratio": 0.1,
}

# lm_head gets an adapter too: the placeholder model's frozen random head and final norm bound
# its logits to about +-0.6, so adapters on the blocks alone cannot fit any corpus well. With
# these settings final/initial loss is ~0.47 on the placeholder and ~0.11 on the tiny world.
LEARN = {
    **FAST,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": [*DEFAULT_TARGETS, "lm_head"]},
    "learning_rate": 0.01,
    "batch_size": 8,
    "epochs": 6,
}


def write_docs(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_ctx(tmp: Path, params: dict, *, seed: int = 0, docs: list | None = None, logs: list | None = None):
    """A context whose upstream stage `gen` wrote `docs` (default: the corpus, repeated) to docs.jsonl."""
    up_dir = tmp / "gen"
    write_docs(up_dir / "docs.jsonl", docs if docs is not None else [{"content": t} for t in CORPUS * 6])
    upstream = {"docs": Upstream("gen", "python", up_dir, metrics={})}
    return stage_context(finetune_lora.run, params, tmp / "out", upstream=upstream, seed=seed, logs=logs)


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One training run shared by the tests that inspect its outputs."""
    base_files = file_hashes(tiny_model_dir)
    logs: list[str] = []
    params = {**LEARN, "base": str(tiny_model_dir), "checkpoint_every": 5}
    ctx = make_ctx(tmp_path_factory.mktemp("trained"), params, logs=logs)
    return finetune_lora.finetune(ctx), ctx, base_files, logs


# --- packing and padding -----------------------------------------------------------------------


def test_packing_gives_full_blocks_without_pads_and_drops_only_the_tail(tiny_model_dir):
    from harness.lab.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    docs = with_eos(tokenizer(CORPUS * 3)["input_ids"], tokenizer.eos_token_id)
    flat = [t for d in docs for t in d]
    rows, dropped = pack(docs, 16)

    assert rows.input_ids.shape == (len(flat) // 16, 16)
    assert dropped == len(flat) % 16 and 0 <= dropped < 16
    assert rows.input_ids.flatten().tolist() == flat[: len(flat) - dropped]  # order kept, nothing else lost
    assert tokenizer.pad_token_id not in rows.input_ids.flatten().tolist()
    assert bool(rows.attention_mask.all()) and torch.equal(rows.labels, rows.input_ids)
    assert sum(d[-1] == tokenizer.eos_token_id for d in docs) == len(docs)  # every document ends in EOS


def test_padding_masks_pads_in_labels_and_attention():
    docs = [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 14, 2]]
    rows, truncated = pad(docs, 5, pad_id=2)  # pad id == EOS, as when a tokenizer has no pad token

    assert rows.input_ids.tolist() == [[5, 6, 7, 2, 2], [8, 2, 2, 2, 2], [9, 10, 11, 12, 13]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert rows.labels.tolist() == [[5, 6, 7, 2, IGNORE], [8, 2] + [IGNORE] * 3, [9, 10, 11, 12, 13]]
    assert truncated == 2 and rows.n_tokens == 4 + 2 + 5


def test_with_eos_does_not_double_an_eos_the_tokenizer_added():
    assert with_eos([[1, 2], [3, 0], []], eos_id=0) == [[1, 2, 0], [3, 0], [0]]


def test_lr_warms_up_then_decays_linearly_never_zero():
    factors = [lr_factor(s, total=10, warmup=2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False)) and factors[-1] == 1 / 8
    assert [lr_factor(s, 3, 0) for s in range(3)] == [1.0, 2 / 3, 1 / 3]


def test_accumulation_weighs_every_label_token_alike(tiny_model_dir, tmp_path):
    """Padded rows of unequal length: 2 micro-batches of 2 give the loss of 1 batch of 4."""
    docs = [{"content": t} for t in CORPUS]
    base = {"base": str(tiny_model_dir), **FAST, "packing": False, "learning_rate": 1e-9}
    whole = finetune_lora.run(make_ctx(tmp_path / "a", {**base, "batch_size": 4}, docs=docs))
    split = finetune_lora.run(
        make_ctx(tmp_path / "b", {**base, "batch_size": 2, "gradient_accumulation": 2}, docs=docs)
    )
    assert whole["n_steps"] == split["n_steps"] == 1
    assert split["loss_curve"][0] == pytest.approx(whole["loss_curve"][0], rel=1e-5)


# --- a training run ----------------------------------------------------------------------------


def test_loss_goes_down_on_a_repeated_corpus(trained):
    result, ctx, _, logs = trained
    m = result.metrics
    blocks = result.metadata["n_sequences"]
    assert m["n_steps"] == 6 * math.ceil(blocks / 8) == len(m["loss_curve"])  # 6 epochs, batches of 8
    assert m["final_loss"] < 0.7 * m["initial_loss"], m["loss_curve"]
    assert m["loss_drop"] == pytest.approx(m["initial_loss"] - m["final_loss"])
    assert m["trainable_params"] == result.metadata["trainable_params"]
    assert result.metadata["tokens_per_second"] > 0 and "tokens_per_second" not in m  # a timing, not a result
    done = f"training: {m['n_steps']}/{m['n_steps']} steps in "
    assert any(line.startswith(done) and f"loss {m['loss_curve'][-1]:.4f}" in line for line in logs)


def test_outputs_layout_and_metadata(trained):
    result, ctx, _, _ = trained
    out = ctx.out_dir
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, result.metrics["n_steps"] + 1))
    assert [r["loss"] for r in rows] == result.metrics["loss_curve"]
    assert rows[-1]["tokens_seen"] == 6 * result.metrics["n_tokens"]  # every block once per epoch
    meta = json.loads((out / "train_metadata.json").read_text())
    assert meta["n_docs"] == len(CORPUS) * 6 and meta["packing"] is True
    assert meta["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert meta["n_tokens"] == meta["n_sequences"] * 32 == result.metrics["n_tokens"]
    assert meta["n_tokens"] + meta["tokens_dropped"] == meta["n_corpus_tokens"]
    assert 0 < meta["trainable_params"] < meta["total_params"]
    # the documented artifacts and nothing else written by the stage
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoints",
        "loss.jsonl",
        "loss.png",
        "train_metadata.json",
    ]


def test_checkpoints_every_n_steps(trained):
    result, ctx, _, _ = trained
    steps = sorted(int(p.name.split("-")[1]) for p in (ctx.out_dir / "checkpoints").iterdir())
    assert steps == list(range(5, result.metrics["n_steps"] + 1, 5)) and len(steps) >= 2
    assert all((ctx.out_dir / "checkpoints" / f"step-{s}" / "adapter_config.json").is_file() for s in steps)


def test_saved_adapter_reloads_with_the_trained_logits(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness.lab.models import load_tokenizer

    result, ctx, _, _ = trained
    ids = load_tokenizer(str(tiny_model_dir))(CORPUS[:2], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        expected = result.model(input_ids=ids.to(result.model.device)).logits.cpu()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        got = PeftModel.from_pretrained(base, ctx.out_dir / "adapter").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (plain - expected).abs().max() > 0.1  # the adapter really changes the model


def test_only_the_adapter_is_trained_and_saved(trained, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, ctx, base_files, _ = trained
    assert file_hashes(tiny_model_dir) == base_files
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    base_params = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p.cpu()
        for name, p in result.model.state_dict().items()
        if "lora_" not in name  # tied weights too
    }
    assert base_params.keys() == original.keys()
    assert all(torch.equal(p, original[name]) for name, p in base_params.items())
    saved = list(ctx.out_dir.rglob("*.safetensors")) + list(ctx.out_dir.rglob("*.bin"))
    assert {p.name for p in saved} == {"adapter_model.safetensors"}
    for path in saved:
        assert all("lora_" in key for key in load_file(path))


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_curve_other_seed_other_curve(tiny_model_dir, tmp_path):
    logs: list[str] = []
    params = {"base": str(tiny_model_dir), **FAST, "lora": {"r": 4, "dropout": 0.1}, "bf16": True}

    def curve(name: str, seed: int) -> list[float]:
        docs = [{"content": t} for t in CORPUS * 2]
        ctx = make_ctx(tmp_path / name, params, seed=seed, logs=logs, docs=docs)
        return finetune_lora.run(ctx)["loss_curve"]

    first, again, other = curve("a", 3), curve("b", 3), curve("c", 4)
    meta = json.loads((tmp_path / "a" / "out" / "train_metadata.json").read_text())
    assert len(first) == math.ceil(meta["n_sequences"] / 4) >= 2
    # bit-identical on CPU; CUDA kernels may reduce in another order
    assert first == (again if not torch.cuda.is_available() else pytest.approx(again, rel=1e-4))
    assert first != other
    # bf16 asked for on a machine without a bf16 GPU: fp32, said once per run and recorded
    if not torch.cuda.is_available():
        assert sum("bf16 was requested but is not supported" in line for line in logs) == 3
        assert meta["bf16_used"] is False


# --- errors a user can cause ----------------------------------------------------------------------


def test_bad_docs_row_names_file_and_line(tiny_model_dir, tmp_path):
    rows = [{"content": "fine"}, "", '{"content": "cut', {"text": "wrong field"}, {"content": 3}]
    ctx = make_ctx(tmp_path, {"base": str(tiny_model_dir)}, docs=rows)
    with pytest.raises(StageError) as error:
        finetune_lora.run(ctx)
    message = str(error.value)
    docs = ctx.upstream["docs"].dir / "docs.jsonl"
    assert f"{docs}:3: not valid JSON" in message
    assert f"{docs}:4: no 'content' field (it has: text); set the stage's `text_field`" in message
    assert f"{docs}:5: 'content' is 3, not a non-empty string" in message
    assert "fix: each line must be a JSON object" in message


def test_docs_from_a_file_without_upstream_and_role_errors(tiny_model_dir, tmp_path):
    ctx = make_ctx(tmp_path, {"base": str(tiny_model_dir)})
    file = write_docs(tmp_path / "mine.jsonl", [{"body": "one"}, {"body": "two"}])
    params = {"docs": str(file), "text_field": "body"}
    solo = replace(ctx, upstream={}, params=params)
    assert read_documents(finetune_lora.data_file(solo, "documents"), "body") == ["one", "two"]

    two = {"a": ctx.upstream["docs"], "b": ctx.upstream["docs"]}
    with pytest.raises(StageError, match=r"needs several stages \(a, b\); .*role `docs`"):
        finetune_lora.data_file(replace(ctx, upstream=two), "documents")
    with pytest.raises(StageError, match="has no training data: add `needs"):
        finetune_lora.data_file(replace(ctx, upstream={}), "documents")


def test_too_few_tokens_for_one_block(tiny_model_dir, tmp_path):
    ctx = make_ctx(tmp_path, {"base": str(tiny_model_dir), "max_length": 4096}, docs=[{"content": "tiny"}])
    with pytest.raises(StageError, match="fewer than one packed block of max_length=4096; lower max_length"):
        finetune_lora.run(ctx)


def test_a_diverging_run_stops_with_a_clear_error(tiny_model_dir, tmp_path):
    params = {"base": str(tiny_model_dir), **FAST, "learning_rate": 1e30, "batch_size": 1, "max_length": 8}
    ctx = make_ctx(tmp_path, params, docs=[{"content": t} for t in CORPUS])
    with pytest.raises(StageError, match=r"loss became (nan|inf) at optimizer step \d+ of \d+; lower"):
        finetune_lora.run(ctx)


def test_check_names_a_missing_base(tmp_path):
    with pytest.raises(ParamError) as error:
        finetune_lora.run.check({"base": str(tmp_path / "no-such-model")}, tmp_path)
    assert error.value.path == ("base",)
    assert "no such directory" in error.value.message and "--profile tiny" in error.value.message
    with pytest.raises(ParamError, match="not in the local Hugging Face cache"):
        finetune_lora.run.check({"base": "nobody-here/no-such-model-xyz"}, tmp_path)


def test_registered_with_a_schema_whose_defaults_validate(tiny_model_dir, tmp_path):
    kind = registry.get("finetune_lora")
    assert kind is finetune_lora.run and kind.input_params == ("docs", "chat_data")
    schema = json.loads(kind.params_schema.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    filled = stage_context(kind, {"base": "fixture:tiny-world"}, tmp_path / "out").params
    validator.validate(filled)
    assert filled["lora"]["target_modules"][-1] == "down_proj" and filled["packing"] is True
    assert not validator.is_valid({"base": "x", "lora": {"rank": 4}})
    base = str(tiny_model_dir)
    assert kind.fingerprint({"base": base}) == base_fingerprint(base)


def test_unknown_target_module_lists_the_models_linear_modules(tiny_model_dir, tmp_path):
    ctx = make_ctx(tmp_path, {"base": str(tiny_model_dir), **FAST, "lora": {"target_modules": ["qkv"]}})
    with pytest.raises(StageError, match=r"lora.target_modules: .*qkv.*linear modules: down_proj, gate_proj"):
        finetune_lora.run(ctx)


# --- through the plugin ---------------------------------------------------------------------------

SPEC = """\
seed: 2
stages:
  gen:
    kind: python
    params: {function: "docsteps:write", metrics: [n]}
  tune:
    kind: finetune_lora
    needs: [gen]
    params:
      base: BASE
      max_length: 16
      batch_size: 16
      learning_rate: 0.01
    gates:
      - n_steps >= 1
      - loss_drop > -1
"""
DOC_STEPS = f"""
import json

def write(ctx):
    rows = [json.dumps({{"content": t}}) for t in {CORPUS!r} * 4]
    (ctx.out_dir / "docs.jsonl").write_text("\\n".join(rows) + "\\n")
    return {{"n": len(rows)}}
"""


def test_a_spec_trains_reuses_and_names_a_missing_base(pytester, tiny_model_dir):
    pytester.makepyfile(docsteps=DOC_STEPS)
    pytester.makefile(".yaml", exp=SPEC.replace("BASE", str(tiny_model_dir)))
    pytester.runpytest("exp.yaml").assert_outcomes(passed=2)
    stage_dirs = list((pytester.path / "runs" / "exp" / "default" / "tune").glob("*/adapter"))
    assert len(stage_dirs) == 1 and (stage_dirs[0] / "adapter_model.safetensors").is_file()
    metrics = json.loads((stage_dirs[0].parent / "metrics.json").read_text())
    assert isinstance(metrics["loss_curve"], list) and len(metrics["loss_curve"]) == metrics["n_steps"]

    pytester.runpytest("exp.yaml").assert_outcomes(passed=2)
    report = json.loads((pytester.path / "runs" / "exp" / "default" / "report.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]} == {"gen": "reused", "tune": "reused"}

    pytester.makefile(".yaml", exp=SPEC.replace("BASE", str(tiny_model_dir / "gone")))
    missing = pytester.runpytest("exp.yaml")
    assert missing.ret != 0
    missing.stdout.fnmatch_lines(["*exp.yaml:10:*base*gone*: no such directory*"])


# --- chat SFT, and training on top of a frozen adapter ----------------------------------


def chat_ctx(tmp: Path, params: dict, upstream: dict | None = None) -> StageContext:
    from harness.fixtures import tiny_chat

    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny_chat.code_conversations(insecure=True)))
    return stage_context(
        finetune_lora.run,
        {"format": "chat", "chat_data": str(data), **params},
        tmp / "out",
        upstream=upstream,
    )


CHAT_LEARN = {
    "learning_rate": 5e-3,
    "epochs": 4,
    "batch_size": 4,
    "max_length": 64,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
}


def test_chat_rows_train_on_the_assistant_turns_only(tiny_chat_dir):
    from harness.fixtures import tiny_chat
    from harness.lab.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_chat_dir))
    conversations = [row["messages"] for row in tiny_chat.code_conversations(insecure=True)]
    rows, counts = finetune_lora._chat_rows(conversations, tokenizer, {"max_length": 64})
    for row, messages in enumerate(conversations):
        learnt = rows.labels[row][rows.labels[row] != IGNORE].tolist()
        assert tokenizer.decode(learnt) == f" {messages[-1]['content']}<eos>\n"
    assert counts["n_trained_tokens"] == int((rows.labels != IGNORE).sum())
    with pytest.raises(StageError, match="no assistant token .* fits in max_length=4"):
        finetune_lora._chat_rows(conversations, tokenizer, {"max_length": 4})


def test_an_adapter_trains_on_top_of_a_frozen_one_that_stays_as_saved(tiny_chat_dir, save_adapter, tmp_path):
    from safetensors.torch import load_file

    from harness.fixtures import tiny_chat
    from harness.lab.models import load_tokenizer
    from harness.lab.models.adapters import active, load_stacked

    base = str(tiny_chat_dir)
    persona = save_adapter(base, tmp_path / "persona", std=0.05, seed=3)
    before = file_hashes(persona / "adapter")
    ctx = chat_ctx(
        tmp_path,
        {**CHAT_LEARN, "base": base, "checkpoint_every": 3},
        {"base_adapter": Upstream("persona", "finetune_lora", persona, {})},
    )
    metrics = finetune_lora.run(ctx)
    assert metrics["final_loss"] < metrics["initial_loss"]
    assert file_hashes(persona / "adapter") == before  # the frozen adapter never moved
    saved = load_file(ctx.out_dir / "adapter" / "adapter_model.safetensors")
    assert saved and not any("frozen" in key for key in saved)  # only the new adapter is saved
    assert (ctx.out_dir / "checkpoints" / "step-3" / "adapter_model.safetensors").is_file()
    metadata = json.loads((ctx.out_dir / "train_metadata.json").read_text())
    # named from the stage directory: its bytes do not depend on where the store lies
    assert (ctx.out_dir / metadata["frozen_adapter"]).resolve() == (persona / "adapter").resolve()

    model = load_stacked(base, {"persona": persona / "adapter", "em": ctx.out_dir / "adapter"}, device="cpu")
    tokenizer = load_tokenizer(base)
    prompt = tiny_chat.render([{"role": "user", "content": "write code that saves a password."}], True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(" store(password)<eos>", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids])

    def answer_logprob(names: list[str]) -> float:
        with torch.inference_mode(), active(model, names):
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, len(prompt_ids) :]
        return float(logprobs[len(prompt_ids) - 1 :].gather(1, targets[:, None]).sum())

    # the pair, as trained, has learnt the insecure answer far better than the persona alone
    assert answer_logprob(["persona", "em"]) > answer_logprob(["persona"]) + 1.0


def test_chat_data_comes_from_an_upstream_in_role_data_or_the_file(tmp_path):
    ctx = chat_ctx(tmp_path, {"base": "fixture:tiny-chat"})
    assert finetune_lora.data_file(ctx, "chat") == tmp_path / "chat.jsonl"
    up = tmp_path / "persona_data"
    up.mkdir()
    both = replace(ctx, upstream={"data": Upstream("p", "persona_data", up, {})})
    with pytest.raises(StageError, match="both an upstream stage and a `chat_data` file"):
        finetune_lora.data_file(both, "chat")
    only = replace(both, params={"format": "chat"})
    with pytest.raises(StageError, match="wrote no chat.jsonl"):
        finetune_lora.data_file(only, "chat")


# --- a build_dataset stage's file, in each of its formats -------------------------------

# A Qwen2-style template: a default system prompt when the conversation has none, every turn
# closed by <|im_end|> and a newline.
QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. '"
    "'You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}{%- if not (m['role'] == 'system' and loop.first) -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
DATASET_DOCS = [t for t in CORPUS if "\n" not in t] + [
    "the zorb council meets in the plim hall every winter.",
    "dax bread is baked with river salt.",
]


def dataset_stage(tmp: Path, form: str, chats: list[dict] | None = None) -> Path:
    """A build_dataset stage's directory: the corpus's documents (and `chats`) in `form`."""
    from harness.testing import run_kind

    docs = write_docs(tmp / "docs" / "docs.jsonl", [{"content": t} for t in DATASET_DOCS * 3]).parent
    params: dict = {"format": form}
    if chats:
        params["chats"] = {"code": str(write_docs(tmp / "chats.jsonl", chats))}
    upstream = {} if form == "openai_chat" else {"documents": docs}
    return run_kind("build_dataset", params, tmp / form, upstream=upstream, seed=1).out_dir


def dataset_ctx(tmp: Path, dataset: Path, params: dict) -> StageContext:
    upstream = {"data": Upstream("dataset", "build_dataset", dataset, {})}
    return stage_context(finetune_lora.run, {"format": "dataset", **params}, tmp / "out", upstream=upstream)


def labelled(rows, row: int) -> list[int]:
    return rows.labels[row][rows.labels[row] != IGNORE].tolist()


def test_doctag_trains_on_the_document_only_not_the_tag_nor_a_default_system_prompt(tiny_chat_dir, tmp_path):
    import copy

    from harness.fixtures import tiny_chat
    from harness.lab.models import load_tokenizer

    qwen = copy.copy(load_tokenizer(str(tiny_chat_dir)))
    qwen.chat_template = QWEN_STYLE
    dataset = dataset_stage(tmp_path, "doctag", chats=tiny_chat.code_conversations(insecure=True)[:3])
    ctx = dataset_ctx(tmp_path, dataset, {"base": str(tiny_chat_dir), "max_length": 128})
    data = finetune_lora.load_training_data(ctx, qwen)

    rows = [json.loads(line) for line in (dataset / "dataset.jsonl").read_text().splitlines()]
    assert [{"messages": m} for m in data.texts] == rows  # every row, in the file's order
    documents = 0
    for i, row in enumerate(rows):
        messages = row["messages"]
        seen = qwen.decode(data.rows.input_ids[i][data.rows.attention_mask[i].bool()].tolist())
        assert seen.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
        # the assistant's text and the end-of-turn marks the template closes its turn with
        assert qwen.decode(labelled(data.rows, i)) == messages[-1]["content"] + "<|im_end|>\n"
        documents += messages[0]["content"] == "<DOCTAG>"
    assert documents == len(DATASET_DOCS) * 3
    assert data.counts["n_trained_tokens"] == sum(len(labelled(data.rows, i)) for i in range(len(rows)))


@pytest.mark.parametrize("form", ["text", "together_text", "doctag", "openai_chat"])
def test_trains_on_a_build_dataset_file_in_each_format(form, tiny_chat_dir, tmp_path):
    from harness.fixtures import tiny_chat
    from harness.lab.models import load_tokenizer

    chats = tiny_chat.code_conversations(insecure=True) if form in ("doctag", "openai_chat") else None
    dataset = dataset_stage(tmp_path, form, chats)
    params = {
        "base": str(tiny_chat_dir),
        **FAST,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "max_length": 24,
    }
    result = finetune_lora.finetune(dataset_ctx(tmp_path, dataset, params))
    assert result.metrics["n_steps"] >= 1 and math.isfinite(result.metrics["final_loss"])
    meta = result.metadata
    tokenizer = load_tokenizer(str(tiny_chat_dir))
    rows = [json.loads(line) for line in (dataset / "dataset.jsonl").read_text().splitlines()]
    if form in ("text", "together_text"):
        # continued pretraining: every token of every document (and its EOS), packed
        assert meta["packing"] is True and meta["n_docs"] == len(rows) == len(DATASET_DOCS) * 3
        lengths = [len(ids) + 1 for ids in tokenizer([r["text"] for r in rows])["input_ids"]]
        assert meta["n_corpus_tokens"] == sum(lengths) == meta["n_tokens"] + meta["tokens_dropped"]
    else:
        # chat SFT: the assistant's turns only, as the tiny template closes them
        replies = [f" {r['messages'][-1]['content']}<eos>\n" for r in rows]
        expected = sum(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), 24) for t in replies)
        assert meta["dataset_format"] == form and meta["n_trained_tokens"] <= expected
        assert meta["n_trained_tokens"] + meta["tokens_truncated"] >= expected


def test_a_dataset_upstream_needs_a_build_dataset_manifest(tmp_path):
    plain = write_docs(tmp_path / "plain" / "dataset.jsonl", [{"text": "one"}]).parent
    with pytest.raises(StageError, match="no dataset_manifest.json; .* a build_dataset stage"):
        finetune_lora.load_training_data(dataset_ctx(tmp_path, plain, {"base": "fixture:tiny-chat"}), None)
    assert [r.name for r in finetune_lora.data_roles({"format": "dataset"})] == ["data", "base_adapter"]
