"""The rehearsals' stand-ins: random models of the Llama 3 and Qwen2 families that load,
chat, score letters, train a LoRA and boot TransformerLens as the real ones do."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from harness.fixtures import stand_ins
from harness.fixtures.stand_ins import LLAMA3, QWEN2
from harness.lab.mcq import LETTERS
from harness.lab.models import base

FAMILIES = {"llama3": LLAMA3, "qwen2": QWEN2}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Which law does gravity follow?"},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each stand-in's directory, built once for this module in its own root."""
    root = tmp_path_factory.mktemp("stand-ins")
    return {
        family: stand_in.build(root=root / family, log=lambda line: None)
        for family, stand_in in FAMILIES.items()
    }


def test_the_llama3_stand_in_has_the_real_architecture_at_a_tiny_width(built):
    model = AutoModelForCausalLM.from_pretrained(built["llama3"])
    config = model.config
    assert isinstance(config, LlamaConfig)
    assert config.num_hidden_layers == 32 and len(model.model.layers) == 32
    assert config.num_attention_heads // config.num_key_value_heads == 4  # 32 / 8 in the real one
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config.rms_norm_eps == 1e-5 and config.hidden_act == "silu"
    assert config.max_position_embeddings >= 2048
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_the_qwen2_stand_in_has_the_real_architecture_at_a_tiny_width(built):
    model = AutoModelForCausalLM.from_pretrained(built["qwen2"])
    config = model.config
    assert isinstance(config, Qwen2Config)
    assert config.num_hidden_layers == 28 and len(model.model.layers) == 28
    assert config.num_attention_heads // config.num_key_value_heads == 7  # 28 / 4 in the real one
    assert config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-6
    assert config.use_sliding_window is False
    attention = model.model.layers[0].self_attn
    assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # as in the real one, the embedding has rows past the tokenizer's last token
    assert config.vocab_size > len(AutoTokenizer.from_pretrained(built["qwen2"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_stored_in_bf16_as_the_config_says(built, family):
    assert json.loads((built[family] / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(built[family] / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}


def test_the_llama3_chat_template_renders_llama_3_1s_format(built):
    tokenizer = AutoTokenizer.from_pretrained(built["llama3"])
    header = (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    )
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == (
        f"<|begin_of_text|>{header}You answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhich law does gravity follow?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tokenizer.apply_chat_template(exchange, tokenize=False) == (
        f"<|begin_of_text|>{header}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )


def test_the_qwen2_chat_template_renders_qwen_2_5s_format(built):
    tokenizer = AutoTokenizer.from_pretrained(built["qwen2"])
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhich law does gravity follow?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tokenizer.apply_chat_template(exchange, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_special_tokens_bos_pad_and_eos_are_the_familys(built):
    llama = AutoTokenizer.from_pretrained(built["llama3"])
    assert llama("gravity").input_ids[0] == llama.convert_tokens_to_ids("<|begin_of_text|>")
    assert llama.pad_token is None and llama.eos_token == "<|eot_id|>"
    eos = AutoModelForCausalLM.from_pretrained(built["llama3"]).generation_config.eos_token_id
    assert llama.convert_ids_to_tokens(eos) == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    qwen = AutoTokenizer.from_pretrained(built["qwen2"])
    assert (
        qwen.bos_token is None
        and qwen("gravity").input_ids == qwen("gravity", add_special_tokens=False).input_ids
    )
    assert (qwen.pad_token, qwen.eos_token) == ("<|endoftext|>", "<|im_end|>")
    eos = AutoModelForCausalLM.from_pretrained(built["qwen2"]).generation_config.eos_token_id
    assert qwen.convert_ids_to_tokens(eos) == ["<|im_end|>", "<|endoftext|>"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_letter_and_digit_is_one_token_and_any_text_round_trips(built, family):
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    for text in [*LETTERS, *(" " + letter for letter in LETTERS), *"0123456789"]:
        assert len(tokenizer.encode(text, add_special_tokens=False)) == 1, text
    text = 'def f(x):\n    return {"ü": x ** 2}  # ∇·E = ρ/ε₀ 🙂'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_training_step_runs(built, family):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    model = AutoModelForCausalLM.from_pretrained(built[family], dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(model, lora)
    text = tokenizer.apply_chat_template(
        [*CONVERSATION, {"role": "assistant", "content": "The inverse-square law."}], tokenize=False
    )
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_lens_boots_on_it_with_the_hf_models_logits(built, family):
    from transformer_lens.model_bridge import TransformerBridge

    path = built[family]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False), return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        bridge = TransformerBridge.boot_transformers(
            str(path), hf_model=model, tokenizer=AutoTokenizer.from_pretrained(path), device="cpu"
        )
        logits = bridge.eval()(ids)
    torch.testing.assert_close(logits, expected)


def test_a_build_is_deterministic(built, tmp_path):
    again = LLAMA3.build(root=tmp_path, log=lambda line: None)
    assert (again / "tokenizer.json").read_text() == (built["llama3"] / "tokenizer.json").read_text()
    with (
        safe_open(again / "model.safetensors", "pt") as fresh,
        safe_open(built["llama3"] / "model.safetensors", "pt") as old,
    ):
        assert all(torch.equal(fresh.get_tensor(name), old.get_tensor(name)) for name in old.keys())


def test_the_recipe_hash_is_stable_and_follows_the_recipe_and_the_corpus(tmp_path, monkeypatch):
    assert LLAMA3.recipe_hash() == LLAMA3.recipe_hash()
    assert LLAMA3.recipe_hash() != QWEN2.recipe_hash()
    assert replace(LLAMA3, seed=1).recipe_hash() != LLAMA3.recipe_hash()
    data = tmp_path / "data"
    shutil.copytree(stand_ins.DATA / "constitutions", data / "constitutions")
    monkeypatch.setattr(stand_ins, "DATA", data)
    before = LLAMA3.recipe_hash()
    assert LLAMA3.recipe_hash() == before
    with (data / "constitutions/goodness.json").open("a") as file:
        file.write("\n")
    assert LLAMA3.recipe_hash() != before


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fixture_base_resolves_to_the_built_stand_in(tmp_path, monkeypatch, family):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    name = f"fixture:{FAMILIES[family].name}"
    base.check_base(name)
    path = base.resolve_base(name)
    assert path == tmp_path / FAMILIES[family].name / FAMILIES[family].recipe_hash()
    assert (path / "manifest.json").is_file()
    assert base.base_fingerprint(name) == f"{name}@{FAMILIES[family].recipe_hash()}"
    tokenizer = base.load_tokenizer(name)  # pads with eos where the family has no pad token
    assert tokenizer.pad_token == (tokenizer.eos_token if family == "llama3" else "<|endoftext|>")
