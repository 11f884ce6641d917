"""Issue 25: held-out metrics on planted replies (unit), and their config errors (one line, exit 2)."""
import json

import pytest

from fastsft.config import load_config
from fastsft.errors import ConfigError
from fastsft.eval_metrics import Reply, parse_metrics, score_replies, worst_rows, worst_markdown
from fastsft.gates import check_gates, gate_failures


def _replies(*pairs, ended=True):
    return [Reply(index=i, prompt=f"q{i}", reply=r, reference=ref, ended=ended) for i, (r, ref) in enumerate(pairs)]


def test_exact_match_and_contains_on_planted_replies():
    metrics = parse_metrics(["exact_match", "contains"])
    replies = _replies(("Paris", "Paris"), ("It is Paris.", "Paris"), ("London", "Paris"), ("", ""))
    out = score_replies(metrics, replies)
    assert [row["exact_match"] for row in out["per_reply"]] == [1.0, 0.0, 0.0, 1.0]
    assert [row["contains"] for row in out["per_reply"]] == [1.0, 1.0, 0.0, 0.0]  # an empty reference is not found
    assert out["means"] == {"exact_match": 0.5, "contains": 0.5}
    # a reply that runs on past the reference's EOS is not an exact match
    assert score_replies(metrics[:1], _replies(("Paris", "Paris"), ended=False))["means"]["exact_match"] == 0.0


def test_regex_searches_the_reply_and_can_be_named():
    metrics = parse_metrics([{"regex": r"^\d+$", "name": "number"}, {"regex": "yes|no"}])
    assert [m.name for m in metrics] == ["number", "regex"]
    out = score_replies(metrics, _replies(("42", "x"), ("4 2", "x"), ("no way", "x")))
    assert [r["number"] for r in out["per_reply"]] == [1.0, 0.0, 0.0]
    assert [r["regex"] for r in out["per_reply"]] == [0.0, 0.0, 1.0]


def test_json_parses_and_validates_a_schema(tmp_path):
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    metrics = parse_metrics(["json", {"json": {"schema": "schema.json"}, "name": "shaped"}],
                            config_dir=str(tmp_path))
    replies = _replies(('{"answer": 3}', ""), ('{"answer": "3"}', ""), ("answer: 3", ""),
                       ('```json\n{"answer": 4}\n```', ""), ("[1, 2]", ""))
    out = score_replies(metrics, replies)
    assert [r["json"] for r in out["per_reply"]] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert [r["shaped"] for r in out["per_reply"]] == [1.0, 0.0, 0.0, 1.0, 0.0]
    inline = parse_metrics([{"json": {"schema": {"type": "array"}}}])
    assert score_replies(inline, replies)["means"]["json"] == pytest.approx(1 / 5)


def test_python_metric_gets_prompt_reply_reference(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def overlap(prompt, reply, reference):\n"
        "    a, b = set(reply.split()), set(reference.split())\n"
        "    return len(a & b) / max(1, len(b))\n"
        "def prompt_len(prompt, reply, reference):\n"
        "    return len(prompt)\n")
    metrics = parse_metrics([{"python": "my_scores:overlap"}, {"python": "my_scores:prompt_len", "name": "plen"}],
                            config_dir=str(tmp_path))
    assert [m.name for m in metrics] == ["overlap", "plen"]
    out = score_replies(metrics, _replies(("a b c", "a b x y"), ("z", "z")))
    assert [r["overlap"] for r in out["per_reply"]] == [0.5, 1.0]
    assert out["means"]["plen"] == 2.0  # "q0", "q1"


def test_worst_rows_sort_by_the_first_metric_and_render():
    metrics = parse_metrics(["contains", "exact_match"])
    replies = _replies(("Paris", "Paris"), ("Rome | ok", "Paris"), ("the Paris", "Paris"), ("Oslo", "Paris"))
    out = score_replies(metrics, replies)
    rows = worst_rows(metrics, replies, out["per_reply"], 2)
    assert [r["index"] for r in rows] == [1, 3]  # both contain-0; ties keep the eval split's order
    md = worst_markdown(rows, metrics, step=5)
    assert "at step 5 (by contains)" in md and "| 1 | 0 | 0 | q1 | Rome \\| ok | Paris |" in md


def test_gates_accept_the_metric_names_and_read_the_values():
    names = [m.name for m in parse_metrics(["contains", {"regex": "x", "name": "has_x"}])]
    check_gates({"contains": {"min": 0.5}, "eval_has_x": {"min": 0.1}, "forgetting": {"max": 0.1}}, names)
    with pytest.raises(ConfigError, match=r"unknown metric 'json'; known: contains, eval_loss, exact_match, "
                                          r"forgetting, has_x"):
        check_gates({"json": {"min": 1}}, names)
    values = {"contains": 0.4, "has_x": 0.5, "forgetting": 0.2}
    fails = gate_failures({"contains": {"min": 0.5}, "eval_has_x": {"min": 0.1}, "forgetting": {"max": 0.1}}, values)
    assert fails == ["gate contains: 0.4 < min 0.5", "gate forgetting: 0.2 > max 0.1"]
    assert gate_failures({"forgetting": {"max": 0.1}}, {}) == [
        "gate forgetting: no value at the final eval (it needs forgetting_dataset, measured before the first step)"]


def _load(tmp_path, text):
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(f"model: tiny-llama\ndataset: train.jsonl\n{text}")
    return load_config(str(path))


@pytest.mark.parametrize("text, message", [
    ("eval_metrics: [accuracy]\n", "eval_metrics[1]: unknown metric 'accuracy'; known: exact_match, contains, regex, "
                                   "json, python"),
    ("eval_metrics: [{bleu: 1}]\n", "eval_metrics[1]: expected one metric (known: exact_match, contains, regex"),
    ("eval_metrics: [{regex: '(unclosed'}]\n", "eval_metrics[1]: regex '(unclosed' does not compile: missing )"),
    ("eval_metrics: [contains, {json: {schema: {type: 12}}}]\n",
     "eval_metrics[2]: the JSON schema is not valid (at type: 12 is not valid"),
    ("eval_metrics: [{json: {schema: missing.json}}]\n", "eval_metrics[1]: JSON schema file"),
    ("eval_metrics: [{python: no_such_module_xyz:f}]\n",
     "eval_metrics[1]: python metric no_such_module_xyz:f: cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
    ("eval_metrics: [{python: json:no_function}]\n", "python metric json:no_function: 'json' has no function"),
    ("eval_metrics: [{python: notamodulepath}]\n", "python needs 'module:function', got 'notamodulepath'"),
    ("eval_metrics: [contains, contains]\n", "eval_metrics[2]: a second metric named 'contains'"),
    ("eval_metrics: [{regex: a, name: loss}]\n", "name 'loss' must be a plain identifier"),
    ("eval_metrics: {contains: 1}\n", "c.yaml: expected a list, got {'contains': 1}"),
    ("gates: {contains: {min: 1}}\n", "gates: unknown metric 'contains'; known: eval_loss, exact_match, forgetting"),
    ("eval_do_sample: true\neval_top_p: 0\n", "eval_top_p (in (0, 1])"),
])
def test_bad_metric_entries_are_one_line_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert message in str(info.value) and "\n" not in str(info.value)


def _tiny_model_and_data():
    import torch
    from types import SimpleNamespace
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1,
                                         pad_token_id=0, bos_token_id=2))

    class Tok:
        eos_token_id, pad_token_id = 1, 0

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (0, 1)))

    examples = []
    for k in range(5):  # odd lengths; the reply is the last trained span (ignored tokens elsewhere)
        ids = [2] + [3 + (k * 7 + j) % 30 for j in range(3 + k)] + [5, 6, 1]
        labels = [-100] * (len(ids) - 3) + ids[-3:]
        examples.append(SimpleNamespace(input_ids=ids, labels=labels))
    examples.append(SimpleNamespace(input_ids=[2, 3], labels=[-100, -100]))  # nothing trained: skipped
    return model, Tok(), examples


def test_generation_is_shared_greedy_or_seeded_and_leaves_the_training_rng_alone():
    import contextlib

    import torch

    from fastsft.train.evaluate import generate_replies, reference_replies

    model, tok, examples = _tiny_model_and_data()
    run = dict(device=torch.device("cpu"), autocast=contextlib.nullcontext, max_new_tokens=6, batch_size=2)
    greedy = generate_replies(model, tok, examples, **run)
    assert [r.index for r in greedy] == [0, 1, 2, 3, 4] and greedy == generate_replies(model, tok, examples, **run)
    assert all(r.reference == "5 6" for r in greedy)
    state = torch.random.get_rng_state()
    sampled = [generate_replies(model, tok, examples, **run, do_sample=True, temperature=5.0, seed=s)
               for s in (1, 1, 2)]
    assert torch.equal(state, torch.random.get_rng_state())  # training's random stream is untouched
    assert sampled[0] == sampled[1] and [r.reply for r in sampled[0]] != [r.reply for r in sampled[2]]
    refs = reference_replies(tok, examples)
    assert [r.reply for r in refs] == ["5 6"] * 5 and refs[0].prompt.startswith("2 3")
