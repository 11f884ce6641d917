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
