import csv
import json

import datasets
import pytest

from forgetless.config import DataConfig
from forgetless.data import IGNORE_INDEX, build_dataset, collator, load_records, tokenize_records
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


@pytest.mark.parametrize("train_on, trained", [("last_assistant", ["lazy dog<eos>"]),
                                               ("all_assistant", ["world<eos>", "lazy dog<eos>"])])
def test_chat_template_messages_train_on_assistant_turns(tiny_llama, tmp_path, train_on, trained):
    tok = load_tokenizer(tiny_llama)
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                        {"role": "user", "content": "fox"}, {"role": "assistant", "content": "lazy dog"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    cfg = DataConfig(train_on=train_on)
    (ex,), _ = tokenize_records(load_records(str(path), cfg), tok, cfg)
    assert trained_texts(tok, ex) == trained
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(row["messages"], tokenize=False)


def trained_texts(tok, example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for label in example["labels"] + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


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
    ('{"question": "a", "answer": "b"}\n', r"d.jsonl:1: cannot tell the format from the fields \['answer', 'question'\]"),
    ('[1, 2]\n', r"d.jsonl:1: expected an object with fields, got list"),
    ('\n\n', r"d.jsonl: no examples found"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', r"d.jsonl:1: the conversation must end with an assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}\n', r"d.jsonl:1: the conversation needs a prompt turn"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}\n',
     r"d.jsonl:1: conversations\[1\].from must be one of"),
    ('{"instruction": "a", "input": 3, "output": "b"}\n', r"d.jsonl:1: field 'input' must be a string, got int"),
    ('{"prompt": "a", "completion": [{"role": "assistant"}]}\n', r"d.jsonl:1: completion\[0\]: missing field 'content'"),
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


def conversation_in_every_format() -> dict[str, dict]:
    """One two-turn conversation (system, history, an input) as each supported format writes it."""
    system, q1, a1, instruction, extra, a2 = "be brief", "hello", "world", "Add these.", "3 + 4", "7"
    q2 = f"{instruction}\n\n{extra}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": q1},
                {"role": "assistant", "content": a1}, {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return {
        "messages": {"messages": messages},
        "sharegpt": {"system": system, "conversations": [{"from": "human", "value": q1}, {"from": "gpt", "value": a1},
                                                         {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]},
        "alpaca": {"system": system, "history": [[q1, a1]], "instruction": instruction, "input": extra, "output": a2},
        "prompt_completion": {"prompt": messages[:4], "completion": [{"role": "assistant", "content": a2}]},
    }


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
@pytest.mark.parametrize("detect", [True, False])
def test_every_format_gives_the_same_example_and_keeps_the_alpaca_input(tiny_llama, tmp_path, fmt, detect):
    tok = load_tokenizer(tiny_llama)
    rows = conversation_in_every_format()
    cfg = DataConfig(format="auto" if detect else fmt)
    reference = tokenize_records(load_records(str(write_jsonl(tmp_path / "m.jsonl", [rows["messages"]])), DataConfig()),
                                 tok, DataConfig())[0]
    got = tokenize_records(load_records(str(write_jsonl(tmp_path / "f.jsonl", [rows[fmt]])), cfg), tok, cfg)[0]
    assert got == reference
    assert "3 + 4" in tok.decode(got[0]["input_ids"])  # alpaca's input is part of the prompt
    assert trained_texts(tok, got[0]) == ["world<eos>", "7<eos>"]


def test_prompt_completion_strings_and_prompt_response_agree(tiny_gpt2, tmp_path):
    tok = load_tokenizer(tiny_gpt2)
    a = load_records(str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "there"}])), DataConfig())
    b = load_records(str(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi", "response": "there"}])), DataConfig())
    assert tokenize_records(a, tok, DataConfig()) == tokenize_records(b, tok, DataConfig())


def test_tool_turns_are_context_never_trained(tiny_llama, tmp_path):
    tok = load_tokenizer(tiny_llama)
    row = {"messages": [{"role": "user", "content": "fox"},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                            "name": "lookup", "arguments": "{}"}}]},
                        {"role": "tool", "content": "the lazy dog", "tool_call_id": "1"},
                        {"role": "assistant", "content": "quick brown"}]}
    (ex,), _ = tokenize_records(load_records(str(write_jsonl(tmp_path / "t.jsonl", [row])), DataConfig()), tok, DataConfig())
    assert "the lazy dog" in tok.decode(ex["input_ids"])
    assert trained_texts(tok, ex) == ["<eos>", "quick brown<eos>"]  # the tool-call turn (this template shows content only)


def test_a_template_that_rewrites_earlier_turns_is_refused_for_all_assistant(tmp_path):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "m", "llama", chat=True)
    tok = load_tokenizer(model_dir)
    # like templates that drop earlier assistant turns' reasoning: an earlier turn renders differently later
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|assistant|>...<eos>"
                         "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    records = load_records(str(write_jsonl(tmp_path / "c.jsonl", [conversation_in_every_format()["messages"]])), DataConfig())
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template renders an earlier turn differently .*\(seen at messages\[4\]\)"):
        tokenize_records(records, tok, DataConfig())
    (ex,), _ = tokenize_records(records, tok, DataConfig(train_on="last_assistant"))
    assert trained_texts(tok, ex) == ["7<eos>"]


def test_globs_splits_and_eval_split_of_the_same_source(tiny_gpt2, tmp_path):
    from forgetless.data import eval_source

    tok = load_tokenizer(tiny_gpt2)
    rows = memorisation_rows(6)
    write_jsonl(tmp_path / "part-0.jsonl", rows[:4])
    write_jsonl(tmp_path / "part-1.jsonl", rows[4:])
    globbed = load_records(str(tmp_path / "part-*.jsonl"), DataConfig())
    assert [r.messages[0]["content"] for r in globbed] == [r["prompt"] for r in rows]
    with pytest.raises(DataError, match="no file matches this pattern"):
        load_records(str(tmp_path / "nothing-*.jsonl"), DataConfig())
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(str(tmp_path / "dd"), DataConfig())) == 4
    assert len(load_records(f"{tmp_path / 'dd'}@test", DataConfig())) == 2
    with pytest.raises(DataError, match=r"no split 'dev' \(it has \['train', 'test'\]\)"):
        load_records(f"{tmp_path / 'dd'}@dev", DataConfig())
    cfg = DataConfig(train=f"{tmp_path / 'dd'}@train", eval="@test")
    assert eval_source(cfg) == f"{tmp_path / 'dd'}@test"
    assert len(build_dataset(eval_source(cfg), tok, cfg)) == 2


def test_hub_dataset_id_from_the_local_cache(tmp_path, monkeypatch):
    """A Hub dataset id resolves through the Hugging Face cache (built here in its layout; HF_HUB_OFFLINE is
    set for the tests); an uncached one is a clear error naming the id and how to fetch it."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--tiny-org--arith"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    write_jsonl(repo / "snapshots" / commit / "train.jsonl", memorisation_rows(5))
    write_jsonl(repo / "snapshots" / commit / "test.jsonl", memorisation_rows(2))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert len(load_records("tiny-org/arith", DataConfig())) == 5
    assert len(load_records("tiny-org/arith@test", DataConfig())) == 2
    with pytest.raises(DataError, match=r"other-org/absent: not a local file, and not in the Hugging Face cache .* "
                                        r"`hf download --repo-type dataset other-org/absent`"):
        load_records("other-org/absent", DataConfig())


def test_a_mixture_of_sources_by_weight_tagged_and_seeded(tiny_gpt2, tmp_path):
    from forgetless.config import load_config
    from forgetless.data import build_training_dataset as tokenised, training_records
    from forgetless.errors import ConfigError

    tok = load_tokenizer(tiny_gpt2)
    build_training_dataset = lambda data, tok, seed: tokenised(training_records(data, seed), tok, data)
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": "x"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(10)])
    sources = f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5, format: alpaca}}]"
    cfg = load_config(None, [sources])
    mixed = build_training_dataset(cfg.data, tok, seed=1)
    tags = mixed["source"]
    assert tags.count(0) == 8 and tags.count(1) == 5  # 2 x 4 and half of 10
    assert mixed.to_list() == build_training_dataset(cfg.data, tok, seed=1).to_list()  # deterministic
    half = lambda seed: [r["input_ids"] for r in build_training_dataset(cfg.data, tok, seed).to_list() if r["source"] == 1]
    assert half(1) != half(2)  # the fraction is a seeded sample
    batch = collator(tok)([dict(r) for r in mixed.to_list()[:3]])
    assert batch["source"].tolist() == tags[:3]
    with pytest.raises(ConfigError, match=r"data.train\[1\].weight: must be > 0"):
        load_config(None, [f"data.train=[{{path: {a}}}, {{path: {b}, weight: 0}}]"])
    with pytest.raises(ConfigError, match="data.eval: '@test' names a split of data.train's source, but data.train lists several"):
        load_config(None, [sources, "data.eval=@test"])


# ---------------------------------------------------------------- text corpora as written (replay, general text)

def test_text_documents_keep_their_newlines_and_a_form_feed_line_ends_one(tmp_path):
    from forgetless.data import load_texts

    path = tmp_path / "c.txt"
    path.write_text("\n\nTitle\n\nFirst paragraph,\nsame paragraph.\n\nSecond.  \n\f\nAnother document.\n\n\f\n\n")
    assert load_texts(str(path)) == ["Title\n\nFirst paragraph,\nsame paragraph.\n\nSecond.", "Another document."]
    path.write_text("one document\n\nstill the same one\n")
    assert load_texts(str(path)) == ["one document\n\nstill the same one"]


def test_document_separator_is_the_pretraining_one_never_the_chat_end_of_turn(tiny_llama, tiny_gpt2, tmp_path):
    from transformers import AutoTokenizer

    from forgetless.data import document_separator
    from forgetless.model import resolve_model_path

    smol = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))  # eos is <|im_end|>, the chat end of turn
    assert document_separator(smol) == ([], [smol.convert_tokens_to_ids("<|endoftext|>")], "")
    chat = load_tokenizer(tiny_llama)  # its eos <eos> ends every chat turn: no token, a paragraph break
    assert document_separator(chat) == ([], [], "\n\n")
    plain = load_tokenizer(tiny_gpt2)
    plain.chat_template = None
    assert document_separator(plain) == ([], [plain.eos_token_id], "")
    # a tokenizer that puts BOS before raw text (Llama, Mistral, Gemma): BOS before each document
    plain.save_pretrained(tmp_path / "bos")
    with_bos = AutoTokenizer.from_pretrained(tmp_path / "bos", bos_token="<unk>")
    with_bos._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<unk> $A", special_tokens=[("<unk>", with_bos.convert_tokens_to_ids("<unk>"))])
    assert document_separator(with_bos) == ([with_bos.bos_token_id], [], "")


def test_shipped_corpora_are_scored_as_written(tmp_path):
    """The general-text yardstick and the KJV replay corpus on the default model: the block stream decodes
    back to the documents as written (newlines, paragraph breaks), each ended by <|endoftext|>; no chat
    end-of-turn anywhere; the KJV documents are its chapters."""
    from forgetless.data import general_domains, load_texts, pack_blocks
    from forgetless.model import resolve_model_path
    from forgetless.sections import DEFAULT_CORPUS, GENERAL_DOMAINS

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    for spec in [*general_domains(GENERAL_DOMAINS).values(), DEFAULT_CORPUS]:
        docs = load_texts(spec)
        blocks = pack_blocks(docs, tok, 128)
        stream = blocks.flatten().tolist()
        expected = "".join(doc + "<|endoftext|>" for doc in docs)
        assert tok.decode(stream) == expected[: len(tok.decode(stream))], spec
        assert tok.convert_tokens_to_ids("<|im_end|>") not in stream, spec
    verne, fortunes = load_texts(GENERAL_DOMAINS["fiction"]), load_texts(GENERAL_DOMAINS["quotations"])
    assert len(verne) == 1 and verne[0].count("\n\n") > 20  # one story, its paragraph breaks kept
    assert len(fortunes) > 300  # each quotation a document
    chapters = load_texts(DEFAULT_CORPUS)
    assert len(chapters) == 278 and chapters[0].startswith("In the beginning God created")
    assert chapters[1].startswith("Thus the heavens and the earth were finished")  # Genesis 2


def test_an_answer_ends_at_the_models_end_of_turn_too(tiny_llama):
    """Chat models whose turn ends with another token than the tokenizer's EOS (Gemma's <end_of_turn>,
    Phi-3's <|end|>) list it in their generation config: generation stops at either, and the answer is cut there."""
    from transformers import AutoModelForCausalLM

    from forgetless.data import end_of_sequence_ids, first_end

    tok, model = load_tokenizer(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama)
    turn_end = tok.convert_tokens_to_ids("<|user|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    assert end_of_sequence_ids(model, tok) == [tok.eos_token_id, turn_end]
    model.generation_config.eos_token_id = tok.eos_token_id
    assert end_of_sequence_ids(model, tok) == [tok.eos_token_id]
    assert first_end([5, 7, turn_end, 9, tok.eos_token_id], [tok.eos_token_id, turn_end]) == 2
    assert first_end([5, 7], [tok.eos_token_id]) is None


def test_short_common_paragraphs_are_not_shared_text():
    from forgetless.data import paragraphs

    text = "Amen.\n\nSee also\n\nA paragraph long enough to be somebody's own writing, not a stock phrase."
    assert paragraphs([text]) == {"A paragraph long enough to be somebody's own writing, not a stock phrase."}
