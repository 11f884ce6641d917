"""Loss masks of every shipped chat template, token by token, against an independent reference.

Per family: a tiny byte-level BPE tokenizer built here with the family's special
tokens, and a reference written in plain Python from the family's public
template: it lays out the rendered text piece by piece, each piece marked
trained or not (the reply and its end-of-turn token are; headers, BOS, default
system blocks and the newline after a turn are not). Reference labels are the
tokens whose offsets overlap a trained piece, plus an appended EOS when the last
message is trained and the text does not end with EOS. fastsft's masks come from
prefix rendering, which shares nothing with this layout.
"""
import pytest

from fastsft.data import IGNORE_INDEX, DataOptions, prepare_data
from fastsft.errors import DataError

CORPUS = ["hello world, hi there, what is 2+2? one two three four. I said ok, done. Be brief, be nice.",
          "Welcome! thanks, any time. bye? say nothing, just this. quote inside."] * 3


def build_family_tokenizer(bos, eos, specials, pad=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = [t for t in dict.fromkeys((pad, bos, eos)) if t]
    extra = [t for t in specials if t not in named]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=named + extra, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad or eos,
                                   additional_special_tokens=extra)


# --- the references: (text, trained) pieces of the full rendering, from the public templates


def _turns(messages, trained, header, end, *, strip=False, newline=""):
    out = []
    for i, m in enumerate(messages):
        content = m["content"].strip() if strip else m["content"]
        out += [(header(m["role"]), False), (content + end, i in trained), (newline, False)]
    return out


def ref_chatml(messages, trained):
    return _turns(messages, trained, lambda r: f"<|im_start|>{r}\n", "<|im_end|>", newline="\n")


def ref_qwen25(messages, trained):
    default = [] if messages and messages[0]["role"] == "system" else [
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
         False)]
    return default + ref_chatml(messages, trained)


def ref_qwen3(messages, trained):
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_query = users[-1] if users else len(messages) - 1
    out = []
    for i, m in enumerate(messages):
        body = m["content"]
        if m["role"] == "assistant" and i > last_query and i == len(messages) - 1:
            body = "<think>\n\n</think>\n\n" + body  # the final reply always opens an (empty) thought
        out += [(f"<|im_start|>{m['role']}\n", False), (body + "<|im_end|>", i in trained), ("\n", False)]
    return out


def ref_llama3(messages, trained):
    return [("<|begin_of_text|>", False)] + _turns(
        messages, trained, lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>", strip=True)


def ref_llama31(messages, trained):
    system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
    skip = 1 if messages and messages[0]["role"] == "system" else 0
    block = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
             f"Today Date: 26 Jul 2024\n\n{system}<|eot_id|>")
    rest = _turns(messages[skip:], {i - skip for i in trained},
                  lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>", strip=True)
    return [(block, False)] + rest


def ref_mistral(messages, trained):
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    out, first_user = [("<s>", False)], True
    for i, m in enumerate(messages):
        if m["role"] == "user":
            opening = system + "\n\n" if first_user and system is not None else ""
            out.append((f"[INST] {opening}{m['content']}[/INST]", False))
            first_user = False
        elif m["role"] == "assistant":
            out.append((" " + m["content"].strip() + "</s>", i in trained))
    return out


def ref_gemma(messages, trained):
    opening = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    out, first = [("<bos>", False)], True
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append((f"<start_of_turn>user\n{opening if first else ''}{m['content'].strip()}<end_of_turn>\n", False))
        elif m["role"] == "assistant":
            out += [("<start_of_turn>model\n", False), (m["content"].strip() + "<end_of_turn>", i in trained),
                    ("\n", False)]
        first = first and m["role"] == "system"
    return out


def ref_phi3(messages, trained):
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "system" and not m["content"]:
            continue
        out += [(f"<|{m['role']}|>\n", False), (m["content"] + "<|end|>", i in trained), ("\n", False)]
    return out + [("<|endoftext|>", len(messages) - 1 in trained)]  # EOS closes every rendering


def ref_phi4(messages, trained):
    return _turns(messages, trained, lambda r: f"<|im_start|>{r}<|im_sep|>", "<|im_end|>")


def ref_deepseek(messages, trained):
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = [("<｜begin▁of▁sentence｜>" + (system[-1] if system else ""), False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append(("<｜User｜>" + m["content"], False))
        elif m["role"] == "assistant":
            out += [("<｜Assistant｜>", False), (m["content"].split("</think>")[-1] + "<｜end▁of▁sentence｜>",
                                                 i in trained)]
    return out


def ref_zephyr(messages, trained):
    return _turns(messages, trained, lambda r: f"<|{r}|>\n", "</s>", newline="\n")


# name -> (reference, bos, eos, special tokens, the end-of-turn text quoted inside contents)
FAMILIES = {
    "chatml": (ref_chatml, None, "<|im_end|>", ["<|im_start|>"], "<|im_end|>"),
    "llama3": (ref_llama3, "<|begin_of_text|>", "<|end_of_text|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "llama3.1": (ref_llama31, "<|begin_of_text|>", "<|eot_id|>",
                 ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"], "<|eot_id|>"),
    "qwen2.5": (ref_qwen25, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], "<|im_end|>"),
    "qwen3": (ref_qwen3, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>", "<think>", "</think>"],
              "<|im_start|>"),
    "mistral": (ref_mistral, "<s>", "</s>", ["[INST]", "[/INST]"], "[/INST]"),
    "gemma": (ref_gemma, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "phi3": (ref_phi3, None, "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
    "phi4": (ref_phi4, "<|endoftext|>", "<|im_end|>", ["<|im_start|>", "<|im_sep|>"], "<|im_sep|>"),
    "deepseek": (ref_deepseek, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                 ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"], "<｜Assistant｜>"),
    "zephyr": (ref_zephyr, "<s>", "</s>", [], "</s>"),
}


def _m(role, content):
    return {"role": role, "content": content}


def conversations(eot):
    return {
        "system_two_turns": [_m("system", "Be brief. Ünïcode ✓"), _m("user", "hi there 👋"),
                             _m("assistant", "hello! ça va?"), _m("user", "what is 2+2?"), _m("assistant", "4")],
        "four_turns": [_m("user", "one"), _m("assistant", "  first reply\n"), _m("user", f"quote {eot} inside"),
                       _m("assistant", ""), _m("user", "three"), _m("assistant", f"<think-ish> I said {eot} ok"),
                       _m("user", "four"), _m("assistant", "done, 完成")],
        "single": [_m("user", "hello"), _m("assistant", "world")],
        "starts_with_assistant": [_m("assistant", "Welcome!"), _m("user", "thanks"), _m("assistant", "any time"),
                                  _m("user", "bye?"), _m("assistant", "bye")],
        "ends_with_user": [_m("system", "Be nice."), _m("user", "hi"), _m("assistant", "hello"), _m("user", "bye?")],
        "reply_only": [_m("assistant", "just this")],
        "empty_last_reply": [_m("user", "say nothing"), _m("assistant", "")],
    }


MODES = ("assistant", "last_assistant", "completion")


def record_and_trained(messages, mode):
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mode == "completion" and messages[-1]["role"] == "assistant":  # prompt/completion data
        cut = replies[-1]
        return {"prompt": messages[:cut], "completion": messages[cut:]}, {cut}
    return {"messages": messages}, set(replies if mode == "assistant" else replies[-1:])


def expected_refusal(family, messages, trained, mode):
    """The message (a regex) fastsft must refuse with, or None when the mask must be exact."""
    if family in ("gemma", "mistral") and messages[0]["role"] == "assistant":
        return "roles must alternate"  # the template's own error, named with the example
    if family == "qwen3":
        roles = [m["role"] for m in messages]
        # A reply between two user turns renders with its <think> block alone, without it in the whole.
        if any("user" in roles[:i] and "user" in roles[i + 1:] for i in trained):
            if roles[-1] != "assistant":
                return r"drops the <think> block.*end the conversation with its last reply"
            return r"drops the <think> block.*mask: last_assistant"
    return None


def reference_encoding(tokenizer, pieces, final_trained):
    text = "".join(piece for piece, _ in pieces)
    spans, position = [], 0
    for piece, trained in pieces:
        if trained and piece:
            spans.append((position, position + len(piece)))
        position += len(piece)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(encoded["input_ids"]), []
    for token, (start, end) in zip(ids, encoded["offset_mapping"]):
        labels.append(token if any(start < b and end > a for a, b in spans) else IGNORE_INDEX)
    if final_trained and not text.rstrip().endswith(tokenizer.eos_token):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return text, ids, labels


@pytest.fixture(scope="module")
def family_tokenizers():
    return {name: build_family_tokenizer(bos, eos, specials) for name, (_, bos, eos, specials, _) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_masks_match_the_reference(family, family_tokenizers, tmp_path, write_jsonl):
    reference, *_, eot = FAMILIES[family]
    tokenizer = family_tokenizers[family]
    checked = refused = 0
    for name, messages in conversations(eot).items():
        for mode in MODES:
            record, trained = record_and_trained(messages, mode)
            options = DataOptions(source=write_jsonl([record], f"{name}-{mode}.jsonl"), mask=mode,
                                  chat_template=family, max_seq_length=4096)
            refusal = expected_refusal(family, messages, trained, mode)
            where = f"{family} / {name} / {mode}"
            if refusal is not None:
                with pytest.raises(DataError, match=rf"example 0: .*{refusal}") as caught:
                    prepare_data(options, tokenizer)
                assert "\n" not in str(caught.value), where
                refused += 1
                continue
            (example,) = prepare_data(options, tokenizer).train
            text, ids, labels = reference_encoding(tokenizer, reference(messages, trained),
                                                   len(messages) - 1 in trained)
            assert tokenizer.decode(example.input_ids[:len(ids)]) == tokenizer.decode(ids), where
            assert example.input_ids == ids, where
            assert example.labels == labels, where
            checked += 1
    assert checked >= 10, family  # most cases are exact in every family
    assert refused == {"gemma": 6, "mistral": 6, "qwen3": 6}.get(family, 0), family


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "deepseek"])
def test_reply_first_never_trains_the_template_preamble(family, family_tokenizers, write_jsonl, trained_runs):
    """Issue 14, miss 1: a conversation that opens with the assistant trains its reply only: not the BOS,
    the header or a default system block ("Cutting Knowledge Date", "You are Qwen")."""
    tokenizer = family_tokenizers[family]
    records = [{"messages": [_m("assistant", "Welcome!"), _m("user", "thanks"), _m("assistant", "any time")]},
               {"prompt": [], "completion": [_m("assistant", "Welcome!")]}]
    for k, record in enumerate(records):
        options = DataOptions(source=write_jsonl([record], f"{k}.jsonl"), chat_template=family)
        (example,) = prepare_data(options, tokenizer).train
        first = trained_runs(example, tokenizer)[0]
        assert first.startswith("Welcome!"), (family, first)


def test_own_template_is_the_default_and_named_one_renders_the_same(family_tokenizers, write_jsonl):
    import copy

    from fastsft.data.templates import named_template

    tokenizer = copy.deepcopy(family_tokenizers["gemma"])
    tokenizer.chat_template = named_template("gemma")
    record = {"messages": conversations("x")["system_two_turns"]}
    source = write_jsonl([record])
    own = prepare_data(DataOptions(source=source), tokenizer).train
    assert own == prepare_data(DataOptions(source=source, chat_template="tokenizer"), tokenizer).train
    assert own == prepare_data(DataOptions(source=source, chat_template="gemma"), tokenizer).train
