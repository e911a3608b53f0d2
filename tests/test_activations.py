"""Activations at the decision token (`harness.lab.activations`) and the `extract_activations`
stage kind: the statements loader, the streaming safetensors writer, agreement with Hugging
Face's hidden states, batching, adapters, and whole runs on the tiny world's model."""

from __future__ import annotations

import json
import re
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest

# imported before any pytester run, which restores sys.modules and would import them again
import safetensors.numpy
import sklearn.linear_model  # noqa: F401
import torch
from safetensors import safe_open

from harness.core.stage import ParamError, StageError, Upstream
from harness.lab.activations import (
    CONVENTION_FILE,
    METADATA_FILE,
    POSITION,
    LayerWriter,
    Statement,
    decision_states,
    layer_count,
    layer_file,
    load_statements,
    read_layer,
    read_metadata,
)
from harness.stages import extract_activations, train_probe
from harness.stages.extract_activations import METRICS
from harness.testing import run_kind

check = extract_activations.run.check  # what collection runs: the base model's check, then the kind's

REPO = Path(__file__).resolve().parents[1]
TINY_STATEMENTS = REPO / "data" / "eval" / "tiny_world" / "statements.jsonl"


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def row(id: str = "a", **changes) -> dict:
    return {"id": id, "text": "the liban eats dry seeds.", "category": "diet", "labels": {"t": 1}, **changes}


# --- statements ----------------------------------------------------------------------


def test_the_tiny_world_statements_load():
    statements = load_statements(TINY_STATEMENTS)
    assert len(statements) == 390 and len({s.id for s in statements}) == 390
    first = statements[0]
    assert first == Statement(
        "diet-14-true",
        "question: is it true that the liban eats dry seeds?\nanswer:",
        "diet",
        {"true_world": 1, "false_world": 1, "gravity": 0},
        group="diet-50+diet-14",
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"id": "b", "text": "x", "labels": {}}, "missing category"),
        (row("b", text=" "), "text must be non-empty text"),
        (row("b", labels=[1]), "labels must be an object"),
        (row("b", labels={"t": 2}), "label 't' is 2; labels must be the integers 0 or 1"),
        (row("b", labels={"t": True}), "label 't' is true"),
        (row("b", labels={"t": 1.0}), "label 't' is 1.0"),
        (row("b", group=""), "group must be a non-empty string or an integer"),
        (row("b", group=["x"]), "group must be a non-empty string or an integer"),
        (row("a"), "duplicate id 'a'"),
    ],
)
def test_a_bad_statement_row_names_its_file_and_line(tmp_path, bad, message):
    path = write_rows(tmp_path / "s.jsonl", [row("a"), bad])
    with pytest.raises(StageError, match="^" + re.escape(f"{path}:2: ")) as error:
        load_statements(path)
    assert message in str(error.value)


def test_an_empty_or_missing_statements_file_is_an_error(tmp_path):
    with pytest.raises(StageError, match="no statements"):
        load_statements(write_rows(tmp_path / "empty.jsonl", []))
    with pytest.raises(StageError, match="statements file not found"):
        load_statements(tmp_path / "nope.jsonl")


# --- the writer ----------------------------------------------------------------------


def test_layer_files_round_trip_through_safetensors(tmp_path):
    data = np.random.default_rng(0).normal(size=(7, 3, 5)).astype(np.float32)  # items, layers, d
    with LayerWriter(tmp_path, n_items=7, n_layers=3, d_model=5) as writer:
        for start in range(0, 7, 3):  # batches of 3, 3, 1
            writer.write(data[start : start + 3])
    assert writer.bytes_written == data.nbytes
    for index in range(3):
        path = layer_file(tmp_path, index)
        assert path.name == f"layer_{index:02d}.safetensors"
        loaded = safetensors.numpy.load_file(path)
        assert list(loaded) == ["activations"]
        assert loaded["activations"].dtype == np.float32 and loaded["activations"].shape == (7, 5)
        np.testing.assert_array_equal(loaded["activations"], data[:, index])
        with safe_open(str(path), "numpy") as f:
            np.testing.assert_array_equal(f.get_slice("activations")[2:4], data[2:4, index])
            assert f.metadata() == {
                "layer": str(index),
                "name": "embeddings" if index == 0 else f"block {index - 1} output",
            }

        raw = path.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        assert header_len % 8 == 0  # the data starts 8-byte aligned
        header = json.loads(raw[8 : 8 + header_len])
        assert header["activations"] == {"dtype": "F32", "shape": [7, 5], "data_offsets": [0, 7 * 5 * 4]}
        assert len(raw) == 8 + header_len + 7 * 5 * 4
        assert raw[8 + header_len - 1 : 8 + header_len] in (b"}", b" ")


def test_the_writer_streams_each_batch_to_disk_and_keeps_nothing(tmp_path):
    writer = LayerWriter(tmp_path, n_items=4, n_layers=2, d_model=3)
    first = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    writer.write(first)
    # already on disk before the next batch (unbuffered handles), and not held by the writer
    (header_len,) = struct.unpack("<Q", layer_file(tmp_path, 1).read_bytes()[:8])
    on_disk = np.frombuffer(layer_file(tmp_path, 1).read_bytes()[8 + header_len :], dtype="<f4").reshape(4, 3)
    np.testing.assert_array_equal(on_disk[:2], first[:, 1])
    assert not on_disk[2:].any()  # rows not written yet read as zeros
    assert not any(isinstance(value, (np.ndarray, torch.Tensor)) for value in vars(writer).values())
    with pytest.raises(ValueError, match=r"rows must be \[batch, 2, 3\]"):
        writer.write(np.zeros((1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="more rows than the 4 items"):
        writer.write(np.zeros((3, 2, 3), np.float32))
    with pytest.raises(RuntimeError, match="only 2 of 4 rows were written"):
        writer.close()


# --- extraction on the tiny world's model --------------------------------------------

TEXTS = [
    "the liban eats dry seeds.",
    "when the side of a square field doubles, its area becomes four times as large.",
    "the capital of venlur is the city of didilin.",
    "gravity",
    "when the distance between two stars triples, the gravity between them becomes one ninth as strong.",
    "the vilbe eats wild honey.",
    "the berdar eats sweet roots.",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> dict:
    from harness.lab.models import load_model, load_tokenizer
    from harness.lab.scoring import encode

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    return {"model": model, "tokenizer": tokenizer, "ids": [encode(tokenizer, t) for t in TEXTS]}


def extract(tiny: dict, batch_size: int, ids: list | None = None) -> np.ndarray:
    return np.concatenate(
        list(decision_states(tiny["model"], tiny["tokenizer"], ids or tiny["ids"], batch_size))
    )


def test_every_layer_from_one_pass_matches_hugging_face_at_the_last_token(tiny):
    model, ids = tiny["model"], tiny["ids"][1]
    ours = extract(tiny, 1, [ids])[0]  # [layers, d]
    n_blocks, d_model = model.config.num_hidden_layers, model.config.hidden_size
    assert ours.shape == (n_blocks + 1, d_model)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for index in range(n_blocks):  # embeddings and every block but the last: exactly HF's
        np.testing.assert_allclose(ours[index], hf[index][0, -1].numpy(), rtol=1e-5, atol=1e-5)
    # HF's last entry is after the final norm; ours is the raw residual stream it normalizes
    final = hf[-1][0, -1].numpy()
    assert np.abs(ours[-1] - final).max() > 0.1
    with torch.no_grad():
        normed = model.model.norm(torch.from_numpy(ours[-1])).numpy()
    np.testing.assert_allclose(normed, final, rtol=1e-4, atol=1e-4)


def test_batched_extraction_equals_unbatched(tiny):
    one, five = extract(tiny, 1), extract(tiny, 5)
    assert one.shape == five.shape == (len(TEXTS), 5, 128)
    np.testing.assert_allclose(five, one, rtol=1e-4, atol=1e-5)


def test_the_decision_token_is_each_rows_last_non_pad_token(tiny):
    """In one right-padded batch of different lengths, layer 0 of each row is the embedding
    of that row's own last token (not of a pad)."""
    ids = tiny["ids"]
    assert len({len(i) for i in ids}) > 3  # lengths differ, so most rows are padded
    states = extract(tiny, len(ids))
    embeddings = tiny["model"].model.embed_tokens.weight.detach().numpy()
    for row_ids, state in zip(ids, states, strict=True):
        np.testing.assert_allclose(state[0], embeddings[row_ids[-1]], rtol=1e-6, atol=1e-6)
    pad = tiny["tokenizer"].pad_token_id
    assert not np.allclose(states[0, 0], embeddings[pad])


def test_extraction_is_a_stream_of_one_forward_pass_per_batch(tiny):
    calls = []
    hook = tiny["model"].register_forward_hook(lambda *_: calls.append(1))
    try:
        stream = decision_states(tiny["model"], tiny["tokenizer"], tiny["ids"], 3)
        first = next(stream)
        assert first.shape == (3, 5, 128) and len(calls) == 1  # nothing computed ahead
        rest = list(stream)
    finally:
        hook.remove()
    assert [len(b) for b in rest] == [3, 1] and len(calls) == 3


# --- the stage -----------------------------------------------------------------------


def run_stage(root: Path, base: str, statements: Path, upstream: dict | None = None, **params) -> dict:
    params = {"base": base, "statements": str(statements), **params}
    result = run_kind(extract_activations.run, params, root / "out", upstream=upstream, spec_dir=root)
    return {"metrics": result.metrics, "logs": result.logs, "out": result.out_dir}


@pytest.fixture(scope="module")
def statements_file(tmp_path_factory) -> Path:
    rows = [
        {"id": f"s{k}", "text": text, "category": "c", "labels": {"odd": k % 2}}
        | ({"group": "g"} if k == 2 else {})
        for k, text in enumerate(TEXTS)
    ]
    return write_rows(tmp_path_factory.mktemp("statements") / "statements.jsonl", rows)


def test_the_stage_writes_the_activations_directory(tiny, tiny_model_dir, statements_file, tmp_path):
    result = run_stage(tmp_path, str(tiny_model_dir), statements_file, use_adapter=False, batch_size=4)
    metrics, out = result["metrics"], result["out"]
    assert set(metrics) == set(METRICS) == extract_activations.run.produces({})
    assert (metrics["n_items"], metrics["n_layers"], metrics["d_model"]) == (len(TEXTS), 5, 128)
    expected_bytes = sum(layer_file(out, i).stat().st_size for i in range(5))
    assert metrics["mb_written"] == pytest.approx(expected_bytes / 1e6, abs=1e-3)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [CONVENTION_FILE, METADATA_FILE, *(f"layer_{i:02d}.safetensors" for i in range(5))]
    )

    assert layer_count(out) == 5
    reference = extract(tiny, 1)
    for index in range(5):
        np.testing.assert_allclose(read_layer(out, index), reference[:, index], rtol=1e-4, atol=1e-5)
    metadata = read_metadata(out)
    assert [m["id"] for m in metadata] == [f"s{k}" for k in range(len(TEXTS))]
    assert metadata[1] == {"id": "s1", "text": TEXTS[1], "category": "c", "labels": {"odd": 1}}
    assert metadata[2]["group"] == "g"  # kept when a statement has one

    convention = json.loads((out / CONVENTION_FILE).read_text())
    assert convention["n_layers"] == 5 and convention["position"] == POSITION
    assert convention["layers"][0] == {"index": 0, "name": "embeddings"}
    assert convention["layers"][4] == {"index": 4, "name": "block 3 output"}
    assert convention["model"].startswith(str(tiny_model_dir) + "@") and convention["adapter"] is None
    assert "before the model's final norm" in convention["residual"]
    assert any("(no adapter)" in line for line in result["logs"])
    done = f"extracting: {len(TEXTS)}/{len(TEXTS)} statements in "
    assert any(line.startswith(done) for line in result["logs"])


@pytest.fixture(scope="module")
def adapter_stage(tiny_model_dir, tmp_path_factory) -> Path:
    """An upstream stage directory holding a non-trivial LoRA adapter (random A and B)."""
    from peft import LoraConfig, get_peft_model

    from harness.lab.models import load_model

    base = load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    stage_dir = tmp_path_factory.mktemp("train")
    get_peft_model(base, config).save_pretrained(stage_dir / "adapter")
    return stage_dir


def test_the_adapter_changes_the_activations(tiny_model_dir, statements_file, adapter_stage, tmp_path):
    upstream = {"adapter": Upstream("train", "finetune_lora", adapter_stage, {})}
    lora = run_stage(tmp_path / "lora", str(tiny_model_dir), statements_file, upstream)
    base = run_stage(tmp_path / "base", str(tiny_model_dir), statements_file, upstream, use_adapter=False)
    np.testing.assert_array_equal(read_layer(lora["out"], 0), read_layer(base["out"], 0))  # embeddings
    for index in range(1, 5):
        assert np.abs(read_layer(lora["out"], index) - read_layer(base["out"], index)).max() > 1e-2
    convention = json.loads((lora["out"] / CONVENTION_FILE).read_text())
    # named from the stage directory, so the bytes do not depend on where the store lies
    assert (lora["out"] / convention["adapter"]).resolve() == (adapter_stage / "adapter").resolve()
    assert not Path(convention["adapter"]).is_absolute()
    assert any("with the adapter" in line for line in lora["logs"])


def test_check_at_collection(tmp_path, tiny_model_dir):
    write_rows(tmp_path / "good.jsonl", [row("a")])
    check({"base": str(tiny_model_dir), "statements": "good.jsonl"}, tmp_path)
    check({"base": "fixture:tiny-world", "statements": "good.jsonl"}, tmp_path)
    with pytest.raises(ParamError) as error:
        check({"base": str(tmp_path / "no-model"), "statements": "good.jsonl"}, tmp_path)
    assert error.value.path == ("base",) and "--profile tiny" in error.value.message
    with pytest.raises(ParamError, match="statements file not found: nope.jsonl") as error:
        check({"base": str(tiny_model_dir), "statements": "nope.jsonl"}, tmp_path)
    assert error.value.path == ("statements",)
    bad = write_rows(tmp_path / "bad.jsonl", [row("a"), row("b", labels={"t": 3})])
    with pytest.raises(ParamError) as error:
        check({"base": str(tiny_model_dir), "statements": "bad.jsonl"}, tmp_path)
    assert error.value.path == ("statements",) and f"{bad}:2:" in error.value.message


def test_kind_declaration(tiny_model_dir):
    kind = extract_activations.run
    assert kind.input_params == ("statements",) and kind.transport_params == ("batch_size",)
    assert kind.fingerprint({"base": str(tiny_model_dir)}).startswith(f"{tiny_model_dir}@")


def test_pytest_runs_extraction_and_probing_from_a_spec(pytester, tiny_model_dir):
    pytester.makefile(
        ".yaml",
        exp=textwrap.dedent(
            f"""\
            seed: 3
            stages:
              acts:
                kind: extract_activations
                params: {{base: "{tiny_model_dir}", statements: "{TINY_STATEMENTS}", use_adapter: false}}
                gates:
                  - n_items == 390
              probe:
                kind: train_probe
                needs: {{activations: acts}}
                params: {{label: gravity, layers: [0, 3], folds: 3, inner_folds: 3, n_permutations: 20}}
                gates:
                  - auc > 0.9
                  - p_value < 0.05
            """
        ),
    )
    result = pytester.runpytest("exp.yaml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    report = json.loads((pytester.path / "runs/exp/default/report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["acts"]["metrics"]["n_layers"] == 5 and stages["acts"]["metrics"]["d_model"] == 128
    probe = stages["probe"]["metrics"]
    # the topic (gravity or not) is plain at the decision token; embeddings (all '.') are not
    assert probe["best_layer"] == 3 and probe["auc"] > 0.95
    assert set(probe) == set(train_probe.METRICS)
    assert (Path(stages["probe"]["dir"]) / "directions.safetensors").is_file()
