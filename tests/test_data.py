import csv
import json

import datasets
import pytest

from forgetless.config import DataConfig
from forgetless.data import IGNORE_INDEX, build_dataset, load_records, tokenize_records
from forgetless.errors import DataError
from forgetless.model import load_tokenizer

from conftest import memorisation_rows, write_jsonl


def test_prompt_tokens_are_masked_and_response_is_kept(tiny_gpt2, tmp_path):
    tok = load_tokenizer(tiny_gpt2)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Calculate 3 + 4.", "response": "7"}])
    (ex,), truncated = tokenize_records(load_records(str(path), DataConfig()), tok, DataConfig())
    assert truncated == 0
    n_prompt = sum(1 for lab in ex["labels"] if lab == IGNORE_INDEX)
    prompt_ids = tok("### User:\nCalculate 3 + 4.\n\n### Assistant:\n", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:n_prompt] == prompt_ids  # the plain template, masked whole
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(ex["labels"][n_prompt:]) == "7<eos>"  # response + eos, trained on
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_chat_template_messages_train_on_last_assistant_turn_only(tiny_llama, tmp_path):
    tok = load_tokenizer(tiny_llama)
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                        {"role": "user", "content": "fox"}, {"role": "assistant", "content": "lazy dog"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    (ex,), _ = tokenize_records(load_records(str(path), DataConfig()), tok, DataConfig())
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == "lazy dog<eos>"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(row["messages"], tokenize=False)


def test_system_prompt_is_prepended(tiny_llama, tmp_path):
    tok = load_tokenizer(tiny_llama)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    cfg = DataConfig(system_prompt="be brief")
    (ex,), _ = tokenize_records(load_records(str(path), cfg), tok, cfg)
    assert tok.decode(ex["input_ids"]).startswith("<|system|>be brief<eos><|user|>a")


def test_all_formats_give_the_same_examples(tiny_gpt2, tmp_path):
    tok = load_tokenizer(tiny_gpt2)
    rows = memorisation_rows()
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(rows)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "ds"))
    reference = build_dataset(str(jsonl), tok, DataConfig()).to_list()
    assert len(reference) == len(rows)
    for other in ["d.json", "d.csv", "d.parquet", "ds"]:
        assert build_dataset(str(tmp_path / other), tok, DataConfig()).to_list() == reference, other


def test_truncation_is_counted_and_keeps_the_prompt(tiny_gpt2, tmp_path):
    tok = load_tokenizer(tiny_gpt2)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "the quick brown fox " * 20},
                                              {"prompt": "hi", "response": "7"}])
    cfg = DataConfig(max_length=24)
    examples, truncated = tokenize_records(load_records(str(path), cfg), tok, cfg)
    assert truncated == 1
    assert len(examples[0]["input_ids"]) == 24
    assert any(t != IGNORE_INDEX for t in examples[0]["labels"])


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', r"d.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r"d.jsonl:2: missing field 'response'"),
    ('{"prompt": "a", "response": "   "}\n', r"d.jsonl:1: field 'response' is empty"),
    ('{"prompt": 3, "response": "b"}\n', r"d.jsonl:1: field 'prompt' must be a string, got int"),
    ('{"question": "a", "answer": "b"}\n', r"d.jsonl:1: expected fields 'prompt' and 'response'"),
    ('[1, 2]\n', r"d.jsonl:1: expected an object with fields, got list"),
    ('\n\n', r"d.jsonl: no examples found"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', r"d.jsonl:1: the last message in 'messages' must be"),
    ('{"messages": [{"role": "robot", "content": "a"}]}\n', r"d.jsonl:1: messages\[0\].role must be one of"),
])
def test_bad_rows_name_file_line_and_field(tiny_gpt2, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_dataset(str(path), load_tokenizer(tiny_gpt2), DataConfig())


def test_non_utf8_and_missing_file_and_unknown_format(tiny_gpt2, tmp_path):
    tok = load_tokenizer(tiny_gpt2)
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        build_dataset(str(bad), tok, DataConfig())
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope.jsonl"), tok, DataConfig())
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported format '.txt'"):
        build_dataset(str(tmp_path / "d.txt"), tok, DataConfig())


def test_response_truncated_away_is_an_error_naming_the_line(tiny_gpt2, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "b"},
                                              {"prompt": "the quick brown fox " * 10, "response": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: the prompt alone is \d+ tokens"):
        build_dataset(str(path), load_tokenizer(tiny_gpt2), DataConfig(max_length=16))


def test_builtin_default_task_is_disjoint():
    cfg = DataConfig()
    train = {r.messages[0]["content"] for r in load_records("builtin:arithmetic/train.jsonl", cfg)}
    test = {r.messages[0]["content"] for r in load_records("builtin:arithmetic/test.jsonl", cfg)}
    assert len(train) == 2000 and len(test) > 400
    assert not train & test
