"""load_model for every kind of spec: tiny, smollm2-135m, dummy:<arch>, a local folder, bad specs."""

from __future__ import annotations

import pytest
import torch

from splitlab import DeviceError, ModelSpecError, load_model
from splitlab.modes.hf_generate import generate_ids
from splitlab.models import model_facts, presets


def test_tiny_builds_a_small_llama(tiny):
    f = tiny.facts
    assert (f.arch, f.num_layers, f.hidden_size, f.num_heads, f.num_kv_heads, f.head_dim) == ("llama", 2, 64, 4, 2, 16)
    assert f.vocab_size == 260 and f.max_positions == 512
    assert f.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert f.weight_bytes == f.num_params * 4
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32
    text = "héllo, splitlab!"
    ids = tiny.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # byte-level: one token per byte
    assert tiny.decode(ids) == text


def test_tiny_is_seeded():
    a, b, c = load_model("tiny", seed=1), load_model("tiny", seed=1), load_model("tiny", seed=2)
    wa, wb, wc = (m.model.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


@pytest.mark.slow
def test_smollm2_answers_a_simple_question(smollm2):
    f = smollm2.facts
    assert f.arch == "llama" and f.num_layers == 30 and f.hidden_size == 576
    assert f.num_params == pytest.approx(134.5e6, rel=0.01)
    ids = smollm2.encode("What is the capital of France?", chat=True)
    answer = smollm2.decode(generate_ids(smollm2, ids, 12))
    assert "Paris" in answer, answer


@pytest.mark.parametrize("name", sorted(presets()))
def test_dummy_shapes_match_the_presets(name):
    preset = presets()[name]
    m = load_model(f"dummy:{name}", device="meta")  # shapes only: no memory, no time
    f = m.facts
    assert f.arch == preset["model_type"]
    assert f.num_layers == preset["num_hidden_layers"]
    assert f.hidden_size == preset["hidden_size"]
    assert f.num_heads == preset["num_attention_heads"]
    assert f.num_kv_heads == preset.get("num_key_value_heads", preset["num_attention_heads"])
    assert f.head_dim == preset.get("head_dim", preset["hidden_size"] // preset["num_attention_heads"])
    assert f.intermediate_size == preset.get("intermediate_size", preset.get("ffn_dim"))
    assert f.vocab_size == preset["vocab_size"]
    assert f.max_positions == preset["max_position_embeddings"]


@pytest.mark.parametrize("name, params", [
    ("llama-3.1-8b", 8.03e9), ("llama-3.2-1b", 1.236e9), ("qwen2.5-7b", 7.62e9),
    ("qwen2.5-0.5b", 0.494e9), ("opt-125m", 0.125e9),
])
def test_dummy_parameter_counts_are_the_real_ones(name, params):
    assert load_model(f"dummy:{name}", device="meta").facts.num_params == pytest.approx(params, rel=0.01)


def test_dummy_runs_on_cpu():
    m = load_model("dummy:opt-125m", device="cpu", dtype="float32")
    assert next(m.model.parameters()).device.type == "cpu"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        logits = m.model(ids).logits
    assert logits.shape == (1, 4, 50272)
    assert torch.isfinite(logits).all()
    assert m.facts.num_params == pytest.approx(125.2e6, rel=0.01)


def test_local_folder_loads_with_from_pretrained(tiny, tmp_path):
    folder = tmp_path / "tiny-saved"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    assert loaded.facts == model_facts(tiny.model)
    for name, p in tiny.model.state_dict().items():
        assert torch.equal(p, loaded.model.state_dict()[name]), name
    prompt = tiny.encode("the same weights give the same tokens")
    assert generate_ids(loaded, prompt, 8) == generate_ids(tiny, prompt, 8)
    assert loaded.decode(loaded.encode("abc")) == "abc"


@pytest.mark.parametrize("spec, message", [
    ("", "accepted: 'tiny', 'smollm2-135m'"),
    ("dummy:no-such-arch", "accepted: dummy:"),
    ("dummy:llama-3.1-8", "did you mean 'dummy:llama-3.1-8b'"),
    ("smollm2", "did you mean 'smollm2-135m'"),
    ("./no/such/folder", "accepted: 'tiny', 'smollm2-135m'"),
    ("/definitely/not/here", "no model folder"),
])
def test_bad_specs_say_what_is_accepted(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model(spec, device="cpu")


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match="could not load"):
        load_model(str(tmp_path), device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(ModelSpecError, match="dtype"):
        load_model("tiny", dtype="float8")
    with pytest.raises(DeviceError, match="unknown device 'tpu'; accepted: 'cpu', 'cuda', 'cuda:N'"):
        load_model("tiny", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            load_model("tiny", device="cuda")


def test_engine_support_check(tiny):
    tiny.require_engine_support("serial")  # llama: fine
    opt = load_model("dummy:opt-125m", device="meta")
    with pytest.raises(ModelSpecError, match="Llama-family"):
        opt.require_engine_support("split")
