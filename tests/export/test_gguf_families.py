"""GGUF round trip for every family patch_model supports: export a tiny model (fp32 weights far from their init,
norms included) to f16 / bf16 / q8_0, load it back with transformers' own GGUF loader, compare logits; the
tokenizer (byte-level BPE or SentencePiece-style) round-trips a chat rendering token for token."""
import json

import pytest
import torch

from fastsft.export.gguf_writer import export_gguf

from fastsft.tiny_families import CHAT, FAMILIES

# (max |logit difference| / max |logit|, mean KL(source || GGUF) per token) over 2 x 33 tokens of models with
# fp32 weights ~ N(0, 1/fan_in). Measured on this CPU over every family and two inputs: f16 <= 2.1e-3 / 6e-7,
# bf16 <= 1.4e-2 / 4e-5, q8_0 <= 5.0e-2 / 4.2e-4. Bounds about 2-5x those.
BOUNDS = {"f16": (5e-3, 5e-6), "bf16": (3e-2, 2e-4), "q8_0": (0.1, 2e-3)}
# how each 2-D weight must be stored (q8_0 rows here are all multiples of 32)
STORED = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


def _load_back(folder, name):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def _mean_kl(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean())


def _tensor_types(path):
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trip(family, family_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = family_dir(family)
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.randint(5, ref.config.vocab_size - 3, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ref(ids).logits
    scale = float(a.abs().max())
    assert scale > 1.0  # not a comparison of near-zero logits
    for qtype, (bound, max_kl) in BOUNDS.items():
        out = tmp_path / f"{family}-{qtype}.gguf"
        export_gguf(str(source), str(out), qtype)
        back = _load_back(tmp_path, out.name)
        assert type(back).__name__ == type(ref).__name__ or family == "mistral"  # llama.cpp: Mistral is llama
        with torch.no_grad():
            b = back(ids).logits
        assert b.shape == a.shape
        rel, kl = float((a - b).abs().max()) / scale, _mean_kl(a, b)
        assert rel <= bound and kl <= max_kl, f"{family} {qtype}: max |logit diff| {rel:.3g} of the largest, KL {kl:.3g}"
        types = _tensor_types(out)
        assert types["blk.0.ffn_down.weight"] == STORED[qtype] and types["blk.0.attn_norm.weight"] == "F32"
        assert ("output.weight" in types) == (not ref.config.tie_word_embeddings)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_tokenizer_round_trip(family, family_dir, tmp_path):
    from transformers import AutoTokenizer

    source = family_dir(family)
    out = tmp_path / "m.gguf"
    export_gguf(str(source), str(out), "f16")
    tok, back = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert back.apply_chat_template(CHAT, tokenize=False) == text
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert back(prompt)["input_ids"] == tok(prompt)["input_ids"]
    assert (back.eos_token_id, back.bos_token_id) == (tok.eos_token_id, tok.bos_token_id)
    assert back.decode(tok(text)["input_ids"], skip_special_tokens=True) == tok.decode(
        tok(text)["input_ids"], skip_special_tokens=True)


def test_tied_llama_has_no_output_tensor(family_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = family_dir("llama", tied=True)
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert ref.config.tie_word_embeddings
    out = tmp_path / "tied.gguf"
    export_gguf(str(source), str(out), "f16")
    assert "output.weight" not in _tensor_types(out)
    back = _load_back(tmp_path, out.name)
    assert back.config.tie_word_embeddings
    ids = torch.randint(5, 200, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(ids).logits, back(ids).logits
    assert float((a - b).abs().max()) <= BOUNDS["f16"][0] * float(a.abs().max())


def _fields(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.t")}


def test_family_metadata_llama_cpp_reads(family_dir, tmp_path):
    """What transformers' loader does not read back but llama.cpp does: checked in the file itself."""
    gemma2 = family_dir("gemma2")
    export_gguf(str(gemma2), str(tmp_path / "g.gguf"), "f16")
    fields = _fields(tmp_path / "g.gguf")
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    assert fields["gemma2.attention.sliding_window"] == 8 and fields["gemma2.attention.key_length"] == 256
    assert fields["gemma2.context_length"] == 256  # full layers see the whole context: not capped at the window
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is False
    qwen3 = family_dir("qwen3")
    export_gguf(str(qwen3), str(tmp_path / "q.gguf"), "f16")
    fields = _fields(tmp_path / "q.gguf")
    assert fields["qwen3.attention.key_length"] == 128 and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in fields["tokenizer.chat_template"]
    assert "tokenizer.ggml.eot_token_id" not in fields
    # Llama-3 style: generation_config lists a second stop id; llama.cpp gets it as the end-of-turn token
    two_stops = _edited_copy(qwen3, tmp_path)
    (two_stops / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    export_gguf(str(two_stops), str(tmp_path / "e.gguf"), "f16")
    eot = _fields(tmp_path / "e.gguf")
    assert eot["tokenizer.ggml.eos_token_id"] == 2 and eot["tokenizer.ggml.eot_token_id"] == 3
    phi3 = family_dir("phi3")
    export_gguf(str(phi3), str(tmp_path / "p.gguf"), "f16")
    fields = _fields(tmp_path / "p.gguf")
    assert fields["phi3.rope.dimension_count"] == 16 and fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is False
    mistral = family_dir("mistral")
    export_gguf(str(mistral), str(tmp_path / "m.gguf"), "f16")
    fields = _fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.add_bos_token"] is True  # a Llama-2-style tokenizer starts with <s>
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["llama.context_length"] == 256
    windowed = _edited_copy(mistral, tmp_path, sliding_window=64)
    export_gguf(str(windowed), str(tmp_path / "w.gguf"), "f16")
    assert _fields(tmp_path / "w.gguf")["llama.context_length"] == 64  # full attention = the window up to 64


def _edited_copy(folder, tmp_path, **changes):
    import shutil

    copy = tmp_path / f"edited-{len(list(tmp_path.glob('edited-*')))}"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("family,changes,message", [
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 64}}, "rope scaling 'yarn'"),
    ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar=64 is not head_dim=256"),
    ("gemma3_text", {"layer_types": ["full_attention", "full_attention"]}, "layer_types"),
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "soft-capping"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("llama", {"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
])
def test_refused_settings(family, changes, message, family_dir, tmp_path, capsys):
    from fastsft.cli import main

    folder = _edited_copy(family_dir(family), tmp_path, **changes)
    out = tmp_path / "x.gguf"
    capsys.readouterr()  # the fixture's own output
    assert main(["export", "gguf", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
])
def test_llama_rope_scaling(rope, tmp_path):
    """Llama-3.1-style and linear rope scaling, as llama.cpp reads them: llama3 as the `rope_freqs` factors (each
    rope frequency divided by its factor), linear as rope.scaling.{type,factor}. transformers' GGUF loader reads
    neither, so the check is on the file: the frequencies llama.cpp derives equal the source model's, and with
    those restored the loaded-back weights give the source's logits."""
    import gguf
    from transformers import AutoModelForCausalLM

    from fastsft.tiny_families import build_model, build_tokenizer

    tokenizer = build_tokenizer("bpe")
    ref = build_model("llama", tokenizer, rope_parameters=rope)
    source = tmp_path / "src"
    ref.save_pretrained(source), tokenizer.save_pretrained(source)
    out = tmp_path / "rope.gguf"
    export_gguf(str(source), str(out), "f16")
    reader = gguf.GGUFReader(str(out))
    inv_freq = ref.model.rotary_emb.inv_freq.double()
    theta, dim = reader.fields["llama.rope.freq_base"].contents(), reader.fields["llama.rope.dimension_count"].contents()
    llama_cpp = 1.0 / (theta ** (torch.arange(0, dim, 2).double() / dim))  # its base frequencies
    if rope["rope_type"] == "llama3":
        factors = {t.name: t for t in reader.tensors}["rope_freqs.weight"].data
        llama_cpp = llama_cpp / torch.from_numpy(factors.copy()).double()
        assert (torch.from_numpy(factors.copy()) > 1).any() and (torch.from_numpy(factors.copy()) == 1).any()
    else:
        assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
        llama_cpp = llama_cpp / reader.fields["llama.rope.scaling.factor"].contents()
    assert torch.allclose(llama_cpp, inv_freq, rtol=1e-6)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    back.model.rotary_emb.inv_freq.copy_(ref.model.rotary_emb.inv_freq)  # what the loader cannot read
    ids = torch.randint(5, 250, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref(ids).logits, back(ids).logits
    assert float((a - b).abs().max()) <= BOUNDS["f16"][0] * float(a.abs().max())
    with torch.no_grad():  # and the scaling matters: without it the logits move far more
        back.model.rotary_emb.inv_freq.copy_(1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim)))
        assert float((a - back(ids).logits).abs().max()) > 5 * float((a - b).abs().max())


# 4/5-bit block types on the tiny Llama (2 x 33 tokens, two inputs), measured mean KL on this CPU:
# q5_1 <= 0.011, q5_0 (not measured separately), q4_1 / q4_0 <= 0.062. Bounds about 3x.
LOW_BIT_KL = {"q5_1": 0.04, "q5_0": 0.06, "q4_1": 0.2, "q4_0": 0.2}


def test_low_bit_types_on_llama(family_dir, tmp_path):
    """q4_0 / q4_1 / q5_0 / q5_1 from the gguf package's quantizers; the embedding and the output projection
    stay q8_0 (llama.cpp's quantize also keeps the output at higher precision)."""
    from transformers import AutoModelForCausalLM

    source = family_dir("llama")
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.randint(5, ref.config.vocab_size - 3, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ref(ids).logits
    previous = 0.0
    for qtype, max_kl in LOW_BIT_KL.items():
        out = tmp_path / f"{qtype}.gguf"
        export_gguf(str(source), str(out), qtype)
        types = _tensor_types(out)
        assert types["blk.1.attn_v.weight"] == qtype.upper() and types["output.weight"] == "Q8_0"
        with torch.no_grad():
            kl = _mean_kl(a, _load_back(tmp_path, out.name)(ids).logits)
        assert 0 < kl <= max_kl, f"{qtype}: mean KL {kl:.3g}"
        previous = max(previous, kl)
    assert previous > 1e-3  # the bits are really dropped (a q8_0 file measures ~3e-4)


def test_gemma_27b_attention_scale_follows_llama_cpp():
    """llama.cpp knows the 27B Gemmas by their layer count and scales their queries by hidden / heads."""
    from transformers import AutoConfig

    from fastsft.errors import ConfigError
    from fastsft.export.gguf_families import family_of, write_hparams

    class Writer:  # records what would be written
        def __getattr__(self, name):
            return lambda *args: None

    for model_type, layers, hidden, heads, head_dim in (("gemma2", 46, 4608, 32, 128), ("gemma3_text", 62, 5376, 32, 128)):
        shape = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
                     num_key_value_heads=16, intermediate_size=64, vocab_size=300)
        good = AutoConfig.for_model(model_type, query_pre_attn_scalar=hidden // heads, **shape)
        write_hparams(Writer(), good, family_of(good))  # accepted
        bad = AutoConfig.for_model(model_type, query_pre_attn_scalar=head_dim, **shape)
        with pytest.raises(ConfigError, match=f"hidden_size / heads \\(27B\\)={hidden // heads}"):
            write_hparams(Writer(), bad, family_of(bad))


def test_llama_with_attention_biases(tmp_path):
    """q/k biases are permuted with their rows (llama.cpp's rope pairs; its llama graph adds optional biases).
    transformers' loader has no key for attention_bias, so the source config is passed to it."""
    from transformers import AutoModelForCausalLM

    from fastsft.tiny_families import build_model, build_tokenizer

    tokenizer = build_tokenizer("bpe")
    ref = build_model("llama", tokenizer, attention_bias=True)
    assert ref.model.layers[0].self_attn.q_proj.bias is not None
    ref.save_pretrained(tmp_path / "src"), tokenizer.save_pretrained(tmp_path / "src")
    export_gguf(str(tmp_path / "src"), str(tmp_path / "b.gguf"), "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="b.gguf", config=ref.config, dtype=torch.float32)
    ids = torch.randint(5, 250, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = ref(ids).logits, back(ids).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_phi3_partial_rotary_is_written(family_dir, tmp_path):
    import gguf

    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    phi3 = _edited_copy(family_dir("phi3"), tmp_path, rope_parameters=rope)
    assert AutoConfig.from_pretrained(phi3).rope_parameters["partial_rotary_factor"] == 0.5
    export_gguf(str(phi3), str(tmp_path / "p.gguf"), "f16")
    assert gguf.GGUFReader(str(tmp_path / "p.gguf")).fields["phi3.rope.dimension_count"].contents() == 8
