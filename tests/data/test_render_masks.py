"""Golden renderings and loss masks per format, template and mask option."""
import copy
import logging

import pytest

from fastsft.data import DEFAULT_CHAT_TEMPLATE, DataOptions, prepare_data, render_inspect
from fastsft.errors import ConfigError, DataError
from fastsft.tiny import build_tokenizer, tiny_llama_config

CHAT = {"messages": [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine, thanks"},
]}
CHATML_TEXT = ("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
               "<|im_start|>assistant\nhello!<|im_end|>\n<|im_start|>user\nhow are you?<|im_end|>\n"
               "<|im_start|>assistant\nfine, thanks<|im_end|>\n")

# Llama-3 style: headers, BOS from the template, <|eot_id|> ends a turn (not the tokenizer's EOS).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Zephyr style: the generation prompt is "<|assistant|>" but a turn starts "<|assistant|>\n".
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    "{% endfor %}"
)
ZEPHYR_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Rewrites earlier assistant turns once a later one exists: prefix renderings differ.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | upper }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def prepare(write_jsonl, tokenizer, records, **options):
    return prepare_data(DataOptions(source=write_jsonl(records), **options), tokenizer)


def with_special_tokens(tokenizer, tokens, template):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(tokens, special_tokens=True)
    tok.chat_template = template
    return tok


def test_chatml_multi_turn_with_system_trains_every_assistant_turn(write_jsonl, tokenizer, trained_runs):
    (example,) = prepare(write_jsonl, tokenizer, [CHAT]).train
    assert tokenizer.decode(example.input_ids) == CHATML_TEXT  # EOS already ends the turn: nothing appended
    assert trained_runs(example) == ["hello!<|im_end|>", "fine, thanks<|im_end|>"]


def test_chatml_mask_agrees_with_generation_markers(write_jsonl, tokenizer):
    """The default template marks assistant content with {% generation %}: HF's own mask must agree."""
    (example,) = prepare(write_jsonl, tokenizer, [CHAT]).train
    hf = tokenizer.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    assert hf["input_ids"] == example.input_ids
    assert hf["assistant_masks"] == [int(label != -100) for label in example.labels]


@pytest.mark.parametrize("mask", ["last_assistant", "completion"])
def test_last_assistant_turn_only(write_jsonl, tokenizer, trained_runs, mask):
    (example,) = prepare(write_jsonl, tokenizer, [CHAT], mask=mask).train
    assert trained_runs(example) == ["fine, thanks<|im_end|>"]


def test_mask_all_trains_every_token(write_jsonl, tokenizer):
    (example,) = prepare(write_jsonl, tokenizer, [CHAT], mask="all").train
    assert example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids) == CHATML_TEXT


def test_llama3_style_template(write_jsonl, tokenizer, trained_runs):
    tok = with_special_tokens(tokenizer, LLAMA3_TOKENS, LLAMA3_TEMPLATE)
    (example,) = prepare(write_jsonl, tok, [CHAT]).train
    assert example.input_ids[0] == tok.bos_token_id  # from the template, not doubled
    assert example.input_ids[1] != tok.bos_token_id
    # <|eot_id|> is not this tokenizer's EOS, so EOS is appended and trained after the last turn.
    assert example.input_ids[-1] == tok.eos_token_id
    assert trained_runs(example, tok) == ["hello!<|eot_id|>", "fine, thanks<|eot_id|><|im_end|>"]


def test_zephyr_style_template(write_jsonl, tokenizer, trained_runs):
    tok = with_special_tokens(tokenizer, ZEPHYR_TOKENS, ZEPHYR_TEMPLATE)
    (example,) = prepare(write_jsonl, tok, [CHAT]).train
    # The generation prompt stops before "\n", so the newline opening each reply is trained too.
    assert trained_runs(example, tok) == ["\nhello!<|im_end|>", "\nfine, thanks<|im_end|>"]
    assert example.input_ids[-1] != tok.eos_token_id  # ends "<|im_end|>\n": EOS present, none appended


def test_template_that_is_not_prefix_stable_is_an_error(write_jsonl, tokenizer, trained_runs):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}, CHAT]
    with pytest.raises(DataError, match=r"example 1: the chat template is not prefix-stable: .* renders earlier "
                                        r"messages differently .*use mask: last_assistant"):
        prepare(write_jsonl, tokenizer, records, chat_template=UNSTABLE_TEMPLATE)
    # the final reply renders the same with or without what follows: last_assistant is exact
    last = prepare(write_jsonl, tokenizer, records, chat_template=UNSTABLE_TEMPLATE, mask="last_assistant")
    assert trained_runs(last.train[1]) == ["fine, thanks<|im_end|>"]
    # mask="all" needs no prefix renderings, so the same template works.
    data = prepare(write_jsonl, tokenizer, records, chat_template=UNSTABLE_TEMPLATE, mask="all")
    assert "HELLO!" in tokenizer.decode(data.train[1].input_ids)


def test_template_error_names_the_example(write_jsonl, tokenizer):
    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
               "{{ m['content'] }}{% endfor %}"
    records = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, CHAT]
    with pytest.raises(DataError, match=r"example 1: the chat template failed.*no system"):
        prepare(write_jsonl, tokenizer, records, chat_template=template)


@pytest.mark.parametrize("prompt, runs, message", [
    # "[bot]" and "[assistant]" part after "[": the reply starts there (longest common prefix)
    ("[bot]", ["assistant]yo<|im_end|>"], "longest common prefix"),
    # nothing shared: the header is trained, and the warning says so
    ("BOT:", ["[assistant]yo<|im_end|>"], "header tokens are trained"),
])
def test_generation_prompt_not_a_prefix(write_jsonl, tokenizer, trained_runs, caplog, prompt, runs, message):
    template = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '" + prompt + "' }}{% endif %}")
    pair = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    records = [{"messages": pair}, {"messages": pair}]
    with caplog.at_level(logging.WARNING, logger="fastsft.data.render"):
        data = prepare(write_jsonl, tokenizer, records, chat_template=template)
    assert [trained_runs(example) for example in data.train] == [runs, runs]
    warnings = [r.getMessage() for r in caplog.records if "generation prompt is not a prefix" in r.getMessage()]
    assert len(warnings) == 1 and "in 2 example(s) (first: example 0)" in warnings[0] and message in warnings[0]


def test_missing_chat_template_is_a_clear_error_and_default_works(write_jsonl, tokenizer, trained_runs):
    bare = build_tokenizer(["hello world"], vocab_size=300, chat_template=None)
    with pytest.raises(ConfigError, match="chat template"):
        prepare(write_jsonl, bare, [CHAT])
    (example,) = prepare(write_jsonl, bare, [CHAT], chat_template="default").train
    assert bare.decode(example.input_ids) == CHATML_TEXT
    assert len(trained_runs(example, bare)) == 2


def test_prompt_completion_strings(write_jsonl, tokenizer, trained_runs):
    records = [{"prompt": "Q: What is 2+2?\nA:", "completion": " It is 4."}]
    (example,) = prepare(write_jsonl, tokenizer, records).train
    assert tokenizer.decode(example.input_ids) == "Q: What is 2+2?\nA: It is 4.<|im_end|>"
    assert trained_runs(example) == [" It is 4.<|im_end|>"]
    (every,) = prepare(write_jsonl, tokenizer, records, mask="all").train
    assert every.labels == every.input_ids


def test_prompt_completion_conversational(write_jsonl, tokenizer, trained_runs):
    records = [{"prompt": CHAT["messages"][:4], "completion": [{"role": "assistant", "content": "fine, thanks"}]}]
    (example,) = prepare(write_jsonl, tokenizer, records, format="prompt_completion").train
    assert tokenizer.decode(example.input_ids) == CHATML_TEXT
    assert trained_runs(example) == ["fine, thanks<|im_end|>"]  # the earlier reply is prompt


@pytest.mark.parametrize("extra, user", [("2+2", "Add\n\n2+2"), ("", "Add"), (None, "Add")])
def test_instruction_renders_as_one_user_turn(write_jsonl, tokenizer, trained_runs, extra, user):
    record = {"instruction": "Add", "output": "4"}
    if extra is not None:
        record["input"] = extra
    (example,) = prepare(write_jsonl, tokenizer, [record]).train
    expected = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert tokenizer.decode(example.input_ids) == expected
    assert trained_runs(example) == ["4<|im_end|>"]


def test_text_trains_every_token_and_eos(write_jsonl, tokenizer, trained_runs):
    (example,) = prepare(write_jsonl, tokenizer, [{"text": "The quick brown fox."}]).train
    assert tokenizer.decode(example.input_ids) == "The quick brown fox.<|im_end|>"
    assert example.labels == example.input_ids


def test_sharegpt_conversations(write_jsonl, tokenizer, trained_runs):
    record = {"conversations": [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "hi there"},
                                {"from": "gpt", "value": "hello!"}, {"from": "human", "value": "how are you?"},
                                {"from": "gpt", "value": "fine, thanks"}]}
    (example,) = prepare(write_jsonl, tokenizer, [record]).train
    assert tokenizer.decode(example.input_ids) == CHATML_TEXT
    assert trained_runs(example) == ["hello!<|im_end|>", "fine, thanks<|im_end|>"]


def test_conversation_without_assistant_is_dropped_and_counted(write_jsonl, tokenizer):
    records = [CHAT, {"messages": [{"role": "user", "content": "anyone?"}]}]
    data = prepare(write_jsonl, tokenizer, records)
    assert [e.source_index for e in data.train] == [0]
    assert data.stats.loaded == 2 and data.stats.kept == 1 and data.stats.dropped_no_trained_tokens == 1


def test_render_inspect_brackets_and_colour(write_jsonl, tokenizer):
    (example,) = prepare(write_jsonl, tokenizer, [CHAT]).train
    plain = render_inspect(example, tokenizer, color=False)
    assert plain == CHATML_TEXT.replace("hello!<|im_end|>", "[[hello!<|im_end|>]]").replace(
        "fine, thanks<|im_end|>", "[[fine, thanks<|im_end|>]]")
    coloured = render_inspect(example, tokenizer, color=True)
    assert coloured.count("\x1b[1;32m") == 2 and "[[" not in coloured


def test_tiny_tokenizer_and_config():
    tok = build_tokenizer(["abc abc abd"], vocab_size=300)
    assert tok.is_fast and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(tok("any text, even ünïcode").input_ids) == "any text, even ünïcode"
    config = tiny_llama_config(len(tok), num_hidden_layers=3)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (
        len(tok), 64, 3, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["x"], vocab_size=100)


def test_random_conversations_match_generation_markers(write_jsonl, tokenizer):
    """Random multi-turn chats (odd whitespace, unicode, empty replies): the prefix-rendering
    mask equals Hugging Face's {% generation %} mask of the default template."""
    import random

    rng = random.Random(11)
    pieces = ["hello", " world", "\n", "  ", "é", "2+2", "fox.", "", "\t", "ünï"]
    records = []
    for _ in range(17):
        messages = [{"role": "system", "content": "".join(rng.choices(pieces, k=3))}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": "".join(rng.choices(pieces, k=rng.randint(1, 6)))})
            messages.append({"role": "assistant", "content": "".join(rng.choices(pieces, k=rng.randint(0, 6)))})
        records.append({"messages": messages})
    data = prepare(write_jsonl, tokenizer, records)
    assert len(data.train) == len(records)
    for example in data.train:
        messages = records[example.source_index]["messages"]
        hf = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        assert hf["input_ids"] == example.input_ids
        assert hf["assistant_masks"] == [int(label != -100) for label in example.labels]
