"""The demo's forgetting probe (fastsft.real_demo) on the real model: the loss per token it reports
scores the reply and its <|im_end|> only, and tells a likely answer from an unlikely one."""
import pytest
import torch

from fastsft import real_demo

pytestmark = pytest.mark.real


def test_answer_loss_scores_the_reply_only(smollm2_fp32, smollm2_tokenizer):
    tok, model = smollm2_tokenizer, smollm2_fp32
    question = "What is 2 + 3?"
    own = real_demo.greedy_answers(model, tok, [question], max_new_tokens=12)[0]
    likely = real_demo.answer_loss_per_token(model, tok, [question], [own])
    unlikely = real_demo.answer_loss_per_token(model, tok, [question], ["Purple elephants sing loudly."])
    assert 0 < likely < unlikely, (own, likely, unlikely)
    # by hand: the reply's tokens and <|im_end|>, each predicted from everything before it
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    reply = tok(own, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([list(prompt) + reply])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
    by_hand = -logp[torch.arange(len(reply)), torch.tensor(reply)].mean()
    assert abs(float(by_hand) - likely) < 1e-4 * max(1.0, likely), (float(by_hand), likely)


def test_side_by_side_rows_are_aligned():
    lines = real_demo._side_by_side([("q" * 50, "before", "after")], width=20)
    assert lines[2].index("|") == lines[0].index("|") == 21 and "..." in lines[2]
