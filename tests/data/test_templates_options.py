"""The chat_template option (names, files, errors), the refusals that need a template of their own,
truncation statistics, and named templates through `fastsft inspect` and `fastsft train`."""
import copy
import json

import pytest

from fastsft.data import DataOptions, prepare_data
from fastsft.data.templates import NAMED_TEMPLATES, named_template, template_names
from fastsft.errors import ConfigError, DataError

CHAT = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"}]

# Reproduces the system placement of Mistral v0.3's public template (written here): the system
# prompt goes into the last user turn, and only when the conversation ends with that user turn.
PUBLIC_MISTRAL_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}{%- for m in turns %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and sys is defined %}{{- '[INST] ' + sys + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + m['content'] | trim + eos_token }}{%- endif %}{%- endfor %}"
)


def test_every_name_is_listed_and_ships_a_template():
    assert template_names() == ["tokenizer", "chatml", "llama3", "llama3.1", "qwen2.5", "qwen3", "mistral", "gemma",
                                "phi3", "phi4", "deepseek", "zephyr", "default"]
    for name in NAMED_TEMPLATES:
        assert "{%" in named_template(name)


def test_unknown_name_is_an_error_listing_the_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown template 'chatlm'; use one of tokenizer, chatml, llama3, .*zephyr"):
        DataOptions(source="x.jsonl", chat_template="chatlm")
    with pytest.raises(ConfigError, match="no such template file: .*absent.jinja"):
        DataOptions(source="x.jsonl", chat_template=str(tmp_path / "absent.jinja"))


def test_jinja_file_default_alias_and_text_render_as_chatml(write_jsonl, tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(named_template("chatml"))
    source = write_jsonl([{"messages": CHAT}])
    results = [prepare_data(DataOptions(source=source, chat_template=value), tokenizer).train
               for value in ("chatml", "default", str(path), named_template("chatml"), None)]
    assert all(r == results[0] for r in results)


def test_missing_special_tokens_are_named(write_jsonl, tokenizer):
    source = write_jsonl([{"messages": CHAT}])
    with pytest.raises(ConfigError, match=r"the llama3 template needs special tokens the tokenizer lacks: "
                                          r"<\|start_header_id\|>, <\|end_header_id\|>, <\|eot_id\|>"):
        prepare_data(DataOptions(source=source, chat_template="llama3"), tokenizer)
    bare = copy.deepcopy(tokenizer)
    bare.bos_token = None
    with pytest.raises(ConfigError, match=r"the gemma template .*bos_token \(unset\), <start_of_turn>"):
        prepare_data(DataOptions(source=source, chat_template="gemma"), bare)


@pytest.mark.parametrize("mask", ["assistant", "last_assistant", "all"])
def test_template_that_drops_the_system_prompt_is_refused_in_every_mode(write_jsonl, tokenizer, mask):
    """Issue 14, miss 4: Mistral v0.3's template drops the system prompt from a conversation that ends
    with a reply; even mask: all must not train without it silently."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["[INST]", "[/INST]"], special_tokens=True)
    source = write_jsonl([{"messages": CHAT}])
    with pytest.raises(DataError, match=r"example 0: the chat template leaves the system message out .*"
                                        r"use chat_template: mistral"):
        prepare_data(DataOptions(source=source, chat_template=PUBLIC_MISTRAL_STYLE, mask=mask), tok)
    (example,) = prepare_data(DataOptions(source=source, chat_template="mistral", mask=mask), tok).train
    assert tok.decode(example.input_ids) == "<s>[INST] Be nice.\n\nhi there[/INST] hello!<|im_end|>"


def test_truncated_example_is_counted_even_when_then_dropped(write_jsonl, tokenizer):
    """Issue 14, miss 6: the first max_seq_length tokens are kept, nothing is appended, and a cut
    example counts as truncated whether it keeps a trained token or not."""
    long_prompt = {"messages": [{"role": "user", "content": "hello world " * 400},
                                {"role": "assistant", "content": "ok"}]}
    long_reply = {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "the quick brown fox " * 40}]}
    data = prepare_data(DataOptions(source=write_jsonl([long_prompt, long_reply]), max_seq_length=32), tokenizer)
    stats = data.stats
    assert (stats.truncated, stats.truncated_no_trained_tokens, stats.dropped_no_trained_tokens, stats.kept) == (
        2, 1, 1, 1)
    (example,) = data.train
    assert len(example) == 32 and example.input_ids[-1] != tokenizer.eos_token_id
    assert "truncated 2 (1 of them left with no trained token, dropped)" in "\n".join(stats.summary_lines())


# --- the command line


def _llama_tokenizer_dir(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   special_tokens=True)
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    directory = tmp_path / "tokenizer"
    tok.save_pretrained(str(directory))
    return directory


def _config(tmp_path, template, tokenizer_dir=None):
    rows = [{"messages": [{"role": "user", "content": f"what is {k}+{k}?"},
                          {"role": "assistant", "content": f"{2 * k}"}]} for k in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer_line = f"tokenizer: {tokenizer_dir}\n" if tokenizer_dir else "tokenizer_vocab_size: 300\n"
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: tiny-llama\nmodel_config: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 1}\n" + tokenizer_line +
        f"dataset: {tmp_path / 'train.jsonl'}\nchat_template: {template}\nmax_seq_length: 96\nbatch_tokens: 256\n"
        f"max_steps: 1\nprogress_bar: 'off'\nmode: full\ndevice: cpu\noutput_dir: {tmp_path / 'out'}\n")
    return str(path)


def test_named_template_in_inspect_and_train(tokenizer, tmp_path, capsys, monkeypatch):
    from fastsft.cli import main

    monkeypatch.setenv("FASTSFT_TRITON_ON_CPU", "0")  # the trainer runs PyTorch ops here
    config = _config(tmp_path, "llama3.1", _llama_tokenizer_dir(tokenizer, tmp_path))
    assert main(["inspect", config, "--examples", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "Cutting Knowledge Date: December 2023" in out and "[[0<|eot_id|>" in out
    assert "llama3.1" not in out.split("--- statistics ---")[0]  # the name is not rendered as text
    assert main(["train", config]) == 0
    assert (tmp_path / "out").is_dir()
    from transformers import AutoTokenizer

    from fastsft.data.templates import named_template

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert saved.chat_template == named_template("llama3.1")  # the trained model carries its template


def test_unknown_or_unfit_template_on_the_command_line_exits_2(tmp_path, capsys):
    from fastsft.cli import main

    assert main(["inspect", _config(tmp_path, "chatlm")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown template 'chatlm'" in err and "\n" not in err
    # the tiny tokenizer trained on the data has ChatML's tokens, not Gemma's
    assert main(["inspect", _config(tmp_path, "gemma")]) == 2
    err = capsys.readouterr().err.strip()
    assert "<start_of_turn>, <end_of_turn>" in err and "\n" not in err
