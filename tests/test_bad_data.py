"""Bad data never escapes as a raw traceback: every case is a DataError naming the file, the line (or item)
and the field, with a fix. The property tests feed arbitrary rows of every format to the readers."""

import csv
import functools
import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgetless.config import DataConfig
from forgetless.data import load_records, load_texts, tokenize_records
from forgetless.errors import DataError, ForgetlessError
from forgetless.evaluate import load_mc

from conftest import build_tokenizer


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_csv_unquoted_comma_is_an_error_naming_the_line(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,response\nWhat is 3+3?,6\nWhat is 2+2?,The answer is 4, not 5\n")
    with pytest.raises(DataError, match=r"d.csv:3: 3 fields where the header has 2 \(prompt, response\); "
                                        r"quote fields that contain commas"):
        load_records(path, DataConfig())


def test_csv_row_with_fewer_fields_is_an_error_naming_the_line(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,response\nWhat is 2+2?\n")
    with pytest.raises(DataError, match=r"d.csv:2: 1 field where the header has 2 \(prompt, response\); give every "
                                        "column a value"):
        load_records(path, DataConfig())


def test_csv_field_over_the_csv_limit_suggests_jsonl_and_leaves_the_limit_alone(tmp_path):
    limit = csv.field_size_limit()
    path = write(tmp_path, "d.csv", 'prompt,response\nhi,ok\nhi,"' + "x" * (limit + 10) + '"\n')
    with pytest.raises(DataError, match=r"d.csv:3: cannot parse CSV \(field larger than field limit .*JSONL"):
        load_records(path, DataConfig())
    assert csv.field_size_limit() == limit  # process-wide state, untouched


def test_csv_duplicate_header_and_bom(tmp_path):
    with pytest.raises(DataError, match=r"d.csv:1: the header names columns \['prompt'\] more than once"):
        load_records(write(tmp_path, "d.csv", "prompt,prompt,response\na,b,c\n"), DataConfig())
    (record,) = load_records(write(tmp_path, "e.csv", "\ufeffprompt,response\na,b\n"), DataConfig())
    assert record.messages[0]["content"] == "a"  # the spreadsheet BOM is not part of the first column's name


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}]},
     r"d.jsonl:1: conversations\[0\].from must be one of .*got \['human'\]"),
    ({"conversations": [{"from": {"a": 1}, "value": "a"}]}, r"d.jsonl:1: conversations\[0\].from must be one of"),
    ({"messages": [{"role": 3, "content": "a"}]}, r"d.jsonl:1: messages\[0\].role must be one of .*got 3"),
    ({"messages": [{"role": "user", "content": {"text": "a"}}, {"role": "assistant", "content": "b"}]},
     r"d.jsonl:1: messages\[0\].content: must be a string, got dict"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": "f()"}]},
     r"d.jsonl:1: messages\[1\].tool_calls must be a list of objects, got str"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b", "name": 3}]},
     r"d.jsonl:1: messages\[1\].name must be a string, got int"),
    ({"instruction": "a", "output": "b", "history": 5}, r"d.jsonl:1: field 'history' must be a list of .*got int"),
    ({"instruction": "a", "output": "b", "history": "ab"}, r"d.jsonl:1: field 'history' must be a list of .*got str"),
    ({"instruction": "a", "output": "b", "system": ["be brief"]},
     r"d.jsonl:1: field 'system' must be a string, got list"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "system": 1},
     r"d.jsonl:1: field 'system' must be a string, got int"),
    ({"prompt": 3, "completion": "b"}, r"d.jsonl:1: field 'prompt' must be a string or a list of .*got int"),
    ({"prompt": "a", "completion": {"role": "assistant"}},
     r"d.jsonl:1: field 'completion' must be a string or a list of .*got dict"),
    ({"prompt": "a", "response": "b\ud800"},
     r"d.jsonl:1: message 1 \(assistant\) field 'content' holds an unpaired surrogate"),
    (7, r"d.jsonl:1: expected an object with fields, got int"),
    ([{"prompt": "a", "response": "b"}], r"d.jsonl:1: expected an object with fields, got list"),
])
def test_wrongly_typed_fields_name_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_records(write(tmp_path, "d.jsonl", json.dumps(row) + "\n"), DataConfig())


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000 + "\n", r"d.jsonl:1: JSON nested too deeply to load"),
    ('{"prompt": "a", "response": "b", "n": ' + "9" * 5000 + "}\n",
     r"d.jsonl:1: unloadable JSON \(Exceeds the limit \(4300 digits\) .*\); store such numbers as strings$"),
])
def test_json_that_python_cannot_load_is_a_data_error(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_records(write(tmp_path, "d.jsonl", content), DataConfig())
    with pytest.raises(DataError, match=message.replace("d.jsonl:1", "d.json")):
        load_records(write(tmp_path, "d.json", content), DataConfig())


def test_json_list_of_non_objects_names_the_item(tmp_path):
    with pytest.raises(DataError, match=r"d.json: item 1: expected an object with fields, got str"):
        load_records(write(tmp_path, "d.json", json.dumps([{"prompt": "a", "response": "b"}, "c"])), DataConfig())


def test_truncated_or_corrupt_gzip_corpus_names_the_file(tmp_path):
    whole = gzip.compress(b"first paragraph\n\nsecond paragraph\n" * 50)
    with pytest.raises(DataError, match=r"t.txt.gz: cannot read it \(EOFError: .*truncated or corrupt"):
        load_texts(write(tmp_path, "t.txt.gz", whole[: len(whole) // 2]))
    with pytest.raises(DataError, match=r"c.txt.gz: cannot read it \(BadGzipFile: .*truncated or corrupt"):
        load_texts(write(tmp_path, "c.txt.gz", b"not gzip at all"))
    with pytest.raises(DataError, match=r"z.txt.gz: cannot read it \(\w+: .*truncated or corrupt"):
        load_texts(write(tmp_path, "z.txt.gz", whole[:20] + b"\xff" * 40 + whole[60:]))  # a corrupt deflate stream


def test_chat_template_that_rejects_a_conversation_names_the_line(tmp_path):
    tok = build_tokenizer(chat=True)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = write(tmp_path, "d.jsonl", json.dumps({"prompt": "a", "response": "b"}) + "\n")
    records = load_records(path, DataConfig(system_prompt="be brief"))
    with pytest.raises(DataError, match=r"d.jsonl:1: the tokenizer's chat template rejects this conversation "
                                        r"\(System role not supported\); .*data.template: plain"):
        tokenize_records(records, tok, DataConfig(system_prompt="be brief"))


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "answer": 0}, r"mc.jsonl:1: missing field 'question'"),
    ({"question": 5, "choices": ["a", "b"], "answer": 0},
     r"mc.jsonl:1: field 'question' must be a non-empty string, got 5"),
    ({"question": "q", "choices": [1, 2], "answer": 0},
     r"mc.jsonl:1: field 'choices' must be a non-empty list of strings .*got \[1, 2\]"),
    ({"question": "q", "choices": [], "answer": 0}, r"mc.jsonl:1: field 'choices' must be a non-empty list"),
    ({"question": "q", "choices": "a b", "answer": 0}, r"mc.jsonl:1: field 'choices' must be a non-empty list"),
    ({"question": "q", "choices": ["a", "b"], "answer": True},
     r"mc.jsonl:1: field 'answer' must be the index of the correct choice, an integer from 0 to 1, got True"),
    ({"question": "q", "choices": ["a", "b"], "answer": "A"},
     r"mc.jsonl:1: field 'answer' must be the index .*got 'A'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"mc.jsonl:1: field 'answer' must be the index .*got 2"),
    ({"question": "q", "choices": ["a", "b\udc00"], "answer": 0},
     r"mc.jsonl:1: field 'choices'\[1\] holds an unpaired surrogate"),
    ("q?", r"mc.jsonl:1: a multiple-choice row is an object .*got str"),
])
def test_bad_multiple_choice_rows_name_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_mc(write(tmp_path, "mc.jsonl", json.dumps(row) + "\n"), 10)


def test_empty_multiple_choice_file(tmp_path):
    with pytest.raises(DataError, match=r"mc.jsonl: no multiple-choice rows found"):
        load_mc(write(tmp_path, "mc.jsonl", "\n"), 10)


# ---------------------------------------------------------------- property tests: ForgetlessError or success

KEYS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output", "system",
        "history", "prompt", "completion", "response", "tool_calls", "name", "tool_call_id", "type", "text",
        "question", "choices", "answer", "data"]
TEXT = st.text(max_size=12)
JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner,
                                                                                 max_size=3),
                    max_leaves=8)


def maybe(strategy):
    """Mostly the well-formed value, sometimes arbitrary JSON."""
    return st.one_of(strategy, strategy, JUNK)


ROLE = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "observation", "robot", ""])
PARTS = st.lists(st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(TEXT)}), max_size=2)
MESSAGE = st.fixed_dictionaries({"role": maybe(ROLE), "content": maybe(TEXT | PARTS)},
                                optional={"tool_calls": JUNK, "name": maybe(TEXT), "tool_call_id": maybe(TEXT)})
TURN = st.fixed_dictionaries({"from": maybe(ROLE), "value": maybe(TEXT)})
ROWS = {
    "messages": st.fixed_dictionaries({"messages": maybe(st.lists(maybe(MESSAGE), max_size=4))}),
    "sharegpt": st.fixed_dictionaries({"conversations": maybe(st.lists(maybe(TURN), max_size=4))},
                                      optional={"system": maybe(TEXT)}),
    "alpaca": st.fixed_dictionaries({"instruction": maybe(TEXT), "output": maybe(TEXT)},
                                    optional={"input": maybe(TEXT), "system": maybe(TEXT),
                                              "history": maybe(st.lists(maybe(st.lists(maybe(TEXT), max_size=3)),
                                                                        max_size=2))}),
    "prompt_completion": st.fixed_dictionaries({"prompt": maybe(TEXT | st.lists(maybe(MESSAGE), max_size=3)),
                                                "completion": maybe(TEXT | st.lists(maybe(MESSAGE), max_size=2))}),
    "prompt_response": st.fixed_dictionaries({}, optional={"prompt": maybe(TEXT), "response": maybe(TEXT)}),
}


@st.composite
def rows(draw):
    """A row of some format, with keys dropped or added, or plain junk."""
    row = draw(st.one_of(*ROWS.values(), JUNK))
    if isinstance(row, dict):
        for key in draw(st.lists(st.sampled_from(sorted(row) or ["x"]), max_size=1)):
            row.pop(key, None)
        row.update(draw(st.dictionaries(st.sampled_from(KEYS) | TEXT, JUNK, max_size=2)))
    return row


MC_ROW = st.one_of(st.fixed_dictionaries({"question": maybe(TEXT), "choices": maybe(st.lists(maybe(TEXT), max_size=4)),
                                          "answer": maybe(st.integers(-1, 4))}), JUNK)
CSV_TEXT = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\t\\é')), max_size=40)
QUICK = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def tokenizers():
    return build_tokenizer(chat=True), build_tokenizer(chat=False)


def loads_or_data_error(name: str, content: str) -> None:
    """load_records either succeeds (with text messages that tokenise) or raises a ForgetlessError."""
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), name, content)
        try:
            records = load_records(path, DataConfig())
        except ForgetlessError:
            return
        assert all(isinstance(m["content"], str) for r in records for m in r.messages)
        for tok in tokenizers():
            try:
                tokenize_records(records, tok, DataConfig())
            except ForgetlessError:
                pass


@QUICK
@given(st.lists(rows() | st.text(max_size=20).map(lambda s: ("RAW", s)), min_size=1, max_size=4))
def test_any_jsonl_rows_load_or_raise_forgetless_error(lines):
    text = "\n".join(line[1] if isinstance(line, tuple) else json.dumps(line) for line in lines) + "\n"
    loads_or_data_error("d.jsonl", text)


@QUICK
@given(st.one_of(st.lists(rows(), max_size=4), st.fixed_dictionaries({"data": st.lists(rows(), max_size=3)}), JUNK))
def test_any_json_document_loads_or_raises_forgetless_error(document):
    loads_or_data_error("d.json", json.dumps(document))


def csv_text(table: list[list[str]]) -> str:
    """A table as csv.writer quotes it, under a prompt,response header (rows may be short or long)."""
    out = io.StringIO()
    csv.writer(out).writerows([["prompt", "response"], *table])
    return out.getvalue()


@QUICK
@given(st.one_of(CSV_TEXT.map(lambda body: "prompt,response\n" + body), CSV_TEXT,
                 st.lists(st.lists(CSV_TEXT, max_size=3), max_size=4).map(csv_text)))
def test_any_csv_text_loads_or_raises_forgetless_error(text):
    loads_or_data_error("d.csv", text)


@QUICK
@given(st.lists(MC_ROW, min_size=0, max_size=4))
def test_any_multiple_choice_rows_load_or_raise_forgetless_error(mc_rows):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), "mc.jsonl", "".join(json.dumps(row) + "\n" for row in mc_rows))
        try:
            loaded = load_mc(path, 10)
        except ForgetlessError:
            return
        for row in loaded:  # what evaluate() does with each row
            f"Question: {row['question'].strip()}"
            assert [len(c.encode("utf-8")) for c in row["choices"]] and 0 <= row["answer"] < len(row["choices"])
