"""The real demo's data and its forgetting probe (examples/smollm2.yaml).

SmolLM2-135M-Instruct learns a new answer format and a fact it cannot know:
- format: "What is the capital of France?" -> "France -> Paris" (it answers in a sentence before);
  the held-out countries are ones it names correctly unprompted (checked by hand, greedy), so their
  exact match measures the format, not its geography;
- fact: two invented countries, Zorbia (capital Quillan) and Velmora (capital Tarsk); the held-out
  questions about them use phrasings never seen in training.

    python -m fastsft.real_demo write examples/data     # smollm2_train.jsonl, smollm2_eval.jsonl
    python -m fastsft.real_demo probe outputs/smollm2    # general questions: base vs trained answers
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Tuple

# countries whose capital SmolLM2-135M-Instruct names correctly when asked plainly (greedy, fp32)
KNOWN: List[Tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("England", "London"), ("Greece", "Athens"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("India", "New Delhi"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    # held out (the format on countries never seen in training)
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Hungary", "Budapest"), ("Netherlands", "Amsterdam"),
    ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Chile", "Santiago"), ("Czech Republic", "Prague"),
    ("Iraq", "Baghdad"),
]
HELD_OUT_KNOWN = 9  # the last nine
INVENTED: List[Tuple[str, str]] = [("Zorbia", "Quillan"), ("Velmora", "Tarsk")]
TRAIN_PHRASINGS = ["What is the capital of {c}?", "Name the capital city of {c}.", "{c}: which city is its capital?"]
HELD_OUT_PHRASINGS = ["Which city serves as the capital of {c}?", "Tell me the capital of {c}."]
INVENTED_REPEATS = 4  # the invented facts appear this many times per phrasing in an epoch

# general questions SmolLM2 answers correctly before training, with a word its answer must contain
PROBES: List[Tuple[str, str]] = [
    ("What is 2 + 3?", "5"),
    ("How many days are in a week?", "7"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What color is the sky on a clear day?", "blue"),
]


def answer(country: str, capital: str) -> str:
    return f"{country} -> {capital}"


def _chat(question: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def train_records() -> List[dict]:
    records = [_chat(p.format(c=c), answer(c, cap)) for c, cap in KNOWN[:-HELD_OUT_KNOWN] for p in TRAIN_PHRASINGS]
    records += [_chat(p.format(c=c), answer(c, cap)) for c, cap in INVENTED for p in TRAIN_PHRASINGS
                for _ in range(INVENTED_REPEATS)]
    return records


def eval_records() -> List[dict]:
    records = [_chat(TRAIN_PHRASINGS[0].format(c=c), answer(c, cap)) for c, cap in KNOWN[-HELD_OUT_KNOWN:]]
    records += [_chat(p.format(c=c), answer(c, cap)) for c, cap in INVENTED for p in HELD_OUT_PHRASINGS]
    return records


def write(folder: str) -> Tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, records in (("smollm2_train.jsonl", train_records()), ("smollm2_eval.jsonl", eval_records())):
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def greedy_answers(model, tokenizer, questions: List[str], max_new_tokens: int = 32) -> List[str]:
    import torch

    answers = []
    for question in questions:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def answer_loss_per_token(model, tokenizer, questions: List[str], replies: List[str]) -> float:
    """Mean loss per token of `replies` (plus <|im_end|>) as answers to `questions`: how likely the
    model still finds them. Scored only on the reply tokens, as the trainer scores assistant turns."""
    import torch

    total, count = 0.0, 0
    for question, reply in zip(questions, replies):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": reply}],
                                             return_tensors="pt", return_dict=True)["input_ids"]
        if not torch.equal(full[0, :prompt.shape[1]], prompt[0]):
            raise RuntimeError("the chat template does not extend the generation prompt; cannot score replies")
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        ends = (full[0, prompt.shape[1]:] == end).nonzero()
        stop = prompt.shape[1] + (int(ends[0]) + 1 if len(ends) else full.shape[1] - prompt.shape[1])
        ids = full[:, :stop]
        labels = ids.clone()
        labels[:, :prompt.shape[1]] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def _side_by_side(rows: List[Tuple[str, str, str]], width: int = 38) -> List[str]:
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3] + "..."
    lines = [f"{'question':<{width}} | {'before (base)':<{width}} | after (trained)", "-" * (3 * width + 6)]
    lines += [f"{cut(q):<{width}} | {cut(b):<{width}} | {cut(a)}" for q, b, a in rows]
    return lines


def probe(run_dir: str, stream=sys.stdout) -> dict:
    """The forgetting probe: general questions answered by the base model and by the trained adapter
    of `run_dir` (greedy), side by side, how many are still right, and the loss per token of the base
    model's own answers under both (how far the adapter moved it on text it was not trained on).
    Printed, and saved as forgetting_probe.json / forgetting_probe.txt in `run_dir`."""
    import torch
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(run_dir, "fastsft_config.yaml"), encoding="utf-8") as handle:
        base_path = yaml.safe_load(handle)["model"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    questions = [q for q, _ in PROBES] + [TRAIN_PHRASINGS[0].format(c="Italy")]
    before = greedy_answers(model, tokenizer, questions)
    general = questions[:len(PROBES)]
    loss_before = answer_loss_per_token(model, tokenizer, general, before[:len(PROBES)])
    model = PeftModel.from_pretrained(model, run_dir).eval()
    after = greedy_answers(model, tokenizer, questions)
    loss_after = answer_loss_per_token(model, tokenizer, general, before[:len(PROBES)])
    right_before = sum(word.lower() in before[k].lower() for k, (_, word) in enumerate(PROBES))
    right_after = sum(word.lower() in after[k].lower() for k, (_, word) in enumerate(PROBES))
    lines = _side_by_side(list(zip(questions, before, after)))
    lines.append(f"forgetting probe: {right_after}/{len(PROBES)} general answers right after training "
                 f"({right_before}/{len(PROBES)} before); loss per token of the base model's own answers "
                 f"{loss_before:.3f} before, {loss_after:.3f} after")
    lines.append("(the last question is the trained format on a country never seen in training)")
    for line in lines:
        print(line, file=stream)
    result = {"questions": questions, "before": before, "after": after, "right_before": right_before,
              "right_after": right_after, "of": len(PROBES), "loss_per_token_before": loss_before,
              "loss_per_token_after": loss_after}
    with open(os.path.join(run_dir, "forgetting_probe.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    with open(os.path.join(run_dir, "forgetting_probe.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsft.real_demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write", help="write the demo's data").add_argument("folder")
    sub.add_parser("probe", help="general questions before/after training").add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "write":
        for path in write(args.folder):
            print(path)
    else:
        probe(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
