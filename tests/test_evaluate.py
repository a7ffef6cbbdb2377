"""The evaluation suite and `compare` on tiny models: hand computations, identities, no leakage."""

import collections
import copy
import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgetless import evaluate as evaluate_module, losses as losses_module
from forgetless.config import DataConfig, EvalConfig, load_config
from forgetless.data import load_texts, pack_blocks
from forgetless.errors import DataError, ModelError
from forgetless.replay import ReplayConfig
from forgetless.evaluate import (check_disjoint, choice_logprobs, continuation_logprobs, evaluate, is_correct, measure,
                                 token_logprobs)
from forgetless.model import load_tokenizer

from conftest import GENERAL, write_jsonl

def test_mc_scoring_equals_a_hand_computation(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = load_tokenizer(tiny_llama)
    pairs = [("Question: What jumps?\nAnswer:", " the fox"), ("Question: Sum?\nAnswer:", " 12"), ("hello", " world over")]
    got = continuation_logprobs(model, tok, pairs, batch_size=2, desc="t")
    for (ctx, cont), score in zip(pairs, got):
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        expected = 0.0
        for j, token in enumerate(cont_ids):  # token at position len(ctx)+j is predicted at the position before
            expected += torch.log_softmax(logits[len(ctx_ids) + j - 1], -1)[token].item()
        assert score == pytest.approx(expected, abs=1e-4)



class NoCache(torch.nn.Module):
    """A model whose forward returns no transformers Cache (as a model without one would)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.device = model.device

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.past_key_values = None
        return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_mc_with_each_context_run_once_scores_as_every_pair_does(fixture, request, monkeypatch):
    """choice_logprobs (a context run once, its cache copied for its choices) gives what token_logprobs gives on
    each (context, choice) pair, the hand-checked path above: contexts of many lengths (left padding), choices of
    one token and of several, a question with another number of choices, groups and choice rows cut at 2."""
    model_dir = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    questions = [(enc("Question: What jumps over the lazy dog in the old story?\nAnswer:"),
                  [enc(" the fox"), enc(" a"), enc(" the quick brown fox, of course"), enc(" 12")]),
                 (enc("Sum?"), [enc(" 12"), enc(" twelve and a half")]),
                 (enc("hello there, how are you today, my friend? I hope well"), [enc(" world"), enc(" fine thanks")]),
                 (enc("A"), [enc(" b"), enc(" c d e")])]
    pairs = [(ctx, choice) for ctx, choices in questions for choice in choices]
    expected = token_logprobs(model, tok, pairs, batch_size=3, desc="t")
    for scored in (model, NoCache(model)):
        got = [v for per_question in choice_logprobs(scored, tok, questions, batch_size=2, desc="t") for v in per_question]
        assert got == pytest.approx(expected, abs=1e-4)
    with monkeypatch.context() as patch:  # a transformers that cannot slice logits by a mask (5.17, the GPU image's)
        patch.setattr(losses_module, "logits_mask_supported", lambda: False)
        got = [v for per_question in choice_logprobs(model, tok, questions, batch_size=2, desc="t") for v in per_question]
        assert got == pytest.approx(expected, abs=1e-4)
    # a sliding attention window shorter than a row: scored pair by pair (its cache would keep only the window)
    pair_by_pair = []
    monkeypatch.setattr(evaluate_module, "token_logprobs",
                        lambda *a, **k: pair_by_pair.append(len(a[2])) or token_logprobs(*a, **k))
    model.config.sliding_window = 8
    got = [v for per_question in choice_logprobs(model, tok, questions, batch_size=2, desc="t") for v in per_question]
    assert got == pytest.approx(expected, abs=1e-4) and pair_by_pair == [len(pairs)]


def test_mc_scores_pair_by_pair_where_the_cache_is_not_plain_keys_and_values(tiny_llama, monkeypatch):
    """A model whose cache layers slide (Mistral's, here with a window longer than every row) is scored pair by
    pair, group by group, with the same figures; a NaN score is an error naming the question, never a pick."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = load_tokenizer(tiny_llama)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=64, pad_token_id=tok.pad_token_id)).eval()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    questions = [(enc("Question: What jumps over the lazy dog?\nAnswer:"), [enc(" the fox"), enc(" a"), enc(" 12")]),
                 (enc("Sum?"), [enc(" 12"), enc(" twelve and a half")]), (enc("A"), [enc(" b c"), enc(" d")])]
    pairs = [(ctx, choice) for ctx, choices in questions for choice in choices]
    expected = token_logprobs(model, tok, pairs, batch_size=3, desc="t")
    calls = []
    monkeypatch.setattr(evaluate_module, "token_logprobs",
                        lambda *a, **k: calls.append(len(a[2])) or token_logprobs(*a, **k))
    got = [v for per_question in choice_logprobs(model, tok, questions, batch_size=2, desc="t") for v in per_question]
    assert got == pytest.approx(expected, abs=1e-4) and calls == [4, 3]  # each group's pairs (shortest contexts first)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="non-finite log-probabilities to the choices of question 1"):
        choice_logprobs(model, tok, questions, batch_size=2, desc="t")
    assert len({round(v, 3) for v in expected}) == len(expected)  # distinct scores: a mix-up would show

def test_perplexity_is_exp_of_mean_nll_and_identical_model_has_zero_drift(tiny_llama, suite):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = load_tokenizer(tiny_llama)
    twin = copy.deepcopy(model)
    res = evaluate(twin, tok, suite, DataConfig(), base=model)
    blocks = pack_blocks(load_texts(suite.general_text), tok, 16)[:4]
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, blocks[:, 1:, None]).mean()
    assert res["general_ppl"]["value"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert res["general_ppl"]["n"] == 4 * 15
    assert res["general_drift_kl"]["value"] == 0.0
    alone = evaluate(model, tok, suite, DataConfig())
    for key in ["target_nll", "target_acc", "general_ppl", "mc_acc", "mc_acc_norm", "robust_acc_mean", "robust_acc_std"]:
        assert res[key]["value"] == alone[key]["value"], key  # equal scores, and deterministic
    assert res["mc_acc"]["n"] == 3 and res["target_acc"]["n"] == 6
    assert len(res["robust_acc_per_template"]) == 5


def test_tuned_model_shows_drift(tiny_llama, suite):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = evaluate(tuned, load_tokenizer(tiny_llama), suite, DataConfig(), base=base)
    assert res["general_drift_kl"]["value"] > 0
    lo, hi = res["general_drift_kl"]["ci95"]
    assert lo <= res["general_drift_kl"]["value"] <= hi


def test_never_evaluates_on_training_data(tmp_path, suite):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Calculate 3 + 1.", "response": "4"}])
    with pytest.raises(DataError, match="1 test prompts also appear in the training data"):
        check_disjoint(suite, DataConfig(), [str(train)], [])
    replay = tmp_path / "replay.txt"
    replay.write_text(GENERAL)
    with pytest.raises(DataError, match="shares 1 paragraphs with the replay corpus"):
        check_disjoint(suite, DataConfig(), [], [ReplayConfig(data=str(replay))])
    # one paragraph of the general text inside a longer replay document is found too
    replay.write_text("an unrelated opening paragraph.\n\n" + GENERAL.split("\n\n")[0] + "\n\nand a closing one.")
    with pytest.raises(DataError, match="shares 1 paragraphs with the replay corpus"):
        check_disjoint(suite, DataConfig(), [], [ReplayConfig(data=str(replay))])
    # a replay source of chat rows is checked on its turns' text
    document = next(doc.strip() for doc in GENERAL.split("\n\n") if doc.strip())
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": "Tell me something.", "response": document}])
    with pytest.raises(DataError, match="shares 1 paragraphs with the replay corpus .*chats.jsonl"):
        check_disjoint(suite, DataConfig(), [], [ReplayConfig(data=str(chats))])
    # self-replay prompts the model answers and trains on are never the evaluation's own questions
    from forgetless.assets import resolve_builtin

    shipped = EvalConfig().instructions
    asked = json.loads(open(resolve_builtin(shipped)).readline())["instruction"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a new question\n  {asked}  \n")
    with_instructions = dataclasses.replace(suite, instructions=shipped)
    with pytest.raises(DataError, match=r"replay.self_prompts .*1 prompts are also asked by the evaluation"):
        check_disjoint(with_instructions, DataConfig(), [], [ReplayConfig(data="self", self_prompts=str(prompts))])
    prompts.write_text("a new question\nCalculate 3 + 1.\n")  # a task test prompt
    with pytest.raises(DataError, match=r"replay.self_prompts .*1 prompts are also asked"):
        check_disjoint(suite, DataConfig(), [], [ReplayConfig(data="self", self_prompts=str(prompts))])
    # the shipped defaults are disjoint
    default = load_config(None)
    check_disjoint(default.evaluation, default.data, [default.data.train], [ReplayConfig()])


def test_answer_extractors_and_bootstrap():
    assert is_correct("The answer is 42.", "42", "number")
    assert is_correct("4 - 1 = 3", "3", "number") and not is_correct("3 and then 5", "3", "number")
    assert is_correct("-1,200", "-1200", "number") and not is_correct("no digits", "7", "number")
    assert is_correct("  Paris. ", "paris", "exact") and not is_correct("Paris, France", "paris", "exact")
    assert is_correct("It is Paris, France", "Paris", "contains")
    # a 0/1 measure's value and its 95% interval over items on one seed (forgetless.stats): Wilson's score
    # interval, with the t quantile t_{99, 0.975} in place of z, by hand
    entry = measure({"target_acc": [0.0, 1.0] * 50}, "target_acc", 100)
    z, n, p = 1.9842169515, 100, 0.5
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert entry["value"] == 0.5 and entry["ci95"] == pytest.approx([0.5 - half, 0.5 + half], rel=1e-6)
    low, high = measure({"target_acc": [0.0] * 99 + [1.0]}, "target_acc", 100)["ci95"]
    assert 0.0 < low < 0.01 < high < 0.06  # never zero width, never below 0


def test_compare_end_to_end(tiny_llama, suite, tmp_path, monkeypatch):
    from forgetless.compare import run_compare

    train_file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Calculate {i} + 2.", "response": str(i + 2)} for i in range(8)])
    replay = tmp_path / "replay.txt"
    replay.write_text(("in the beginning was the word. " * 10 + "\n\n") * 20)
    config = load_config(None, [
        f"model.name_or_path={tiny_llama}", f"data.train={train_file}", f"output_dir={tmp_path / 'cmp'}",
        "data.max_length=64", "train.max_steps=3", "train.batch_size=4", "train.progress_bar=false",
        "model.lora.target_modules=all-linear", "train.learning_rate=1e-2", "compare.methods=[sft, lfu, arr]",
    ])
    config.evaluation = suite
    # arr with a small local replay corpus
    from forgetless.registry import PRESETS
    monkeypatch.setitem(PRESETS, "arr", {"regularizers": [{"kl": {}}], "replay": {"data": str(replay), "max_length": 16}})
    report = run_compare(config)
    root = tmp_path / "cmp"
    for name in ["report.md", "report.json", "tradeoff.png", "measures.png"]:
        assert (root / name).stat().st_size > 0, name
    assert set(report["results"]) == {"base", "sft", "lfu", "arr"}
    assert report["results"]["base"]["general_drift_kl"]["value"] == 0.0
    for method in ["sft", "lfu", "arr"]:
        assert report["results"][method]["general_drift_kl"]["value"] > 0
        assert report["runs"][method]["global_steps"] == 3 and report["runs"][method]["step_time_s"] > 0
    table = (root / "report.md").read_text()
    assert "| lfu |" in table and "| base |" in table
    answers = report["results"]["base"]["instr_base_answers"]  # the base's instruction answers: scored, cut
    assert answers["scored"] + answers["cut"] == 40 and f"; the {answers['cut']} still running there (cut) are left out." in table
    assert json.loads((root / "report.json").read_text())["methods"] == ["sft", "lfu", "arr"]
@pytest.mark.slow
def test_lm_eval_backend_runs_in_memory_and_agrees_with_our_mc_scoring(tiny_llama, suite, tmp_path):
    """lm-evaluation-harness through its in-memory HFLM on a local task; our own log-likelihood MC
    scoring follows its convention, so both give the same acc and acc_norm on the same questions."""
    import dataclasses

    from forgetless.errors import ConfigError

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [json.loads(line) for line in open(suite.mc)]
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {suite.mc}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = load_tokenizer(tiny_llama)
    cfg = dataclasses.replace(suite, task=None, general_text=None, lm_eval_tasks=["tiny_mc"],
                              lm_eval_include=str(tasks))
    res = evaluate(model, tok, cfg, DataConfig())
    ours = evaluate(model, tok, dataclasses.replace(suite, task=None, general_text=None), DataConfig())
    got = res["lm_eval"]["tiny_mc"]
    assert got["n"] == len(rows) == ours["mc_acc"]["n"]
    assert got["acc,none"] == pytest.approx(ours["mc_acc"]["value"])
    assert got["acc_norm,none"] == pytest.approx(ours["mc_acc_norm"]["value"])
    with pytest.raises(ConfigError, match="no task 'nonexistent_task'"):
        evaluate(model, tok, dataclasses.replace(cfg, lm_eval_tasks=["nonexistent_task"]), DataConfig())


def test_general_yardstick_of_several_domains(tiny_llama, suite, tmp_path):
    """Per-domain perplexity and drift beside the pooled figures (every block alike), each domain's first
    general_blocks reported; the budget's validation blocks and the curve's come from the blocks after them."""
    from forgetless.budget import Validator
    from forgetless.config import ForgetlessConfig
    from forgetless.curve import ForgettingCurve
    from forgetless.data import general_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = load_tokenizer(tiny_llama)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = tmp_path / "other.txt"
    other.write_text(("hello world over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = .\n\n") * 12)
    domains = {"fox": suite.general_text, "numbers": str(other)}
    cfg = dataclasses.replace(suite, general_text=domains, general_blocks=3)
    res = evaluate(tuned, tok, cfg, DataConfig(), base=model)
    by = res["general_by_domain"]
    assert list(by) == ["fox", "numbers"] and all(d["blocks"] == 3 and d["drift_kl"] > 0 for d in by.values())
    assert by["fox"]["ppl"] != pytest.approx(by["numbers"]["ppl"], rel=1e-3)
    pooled = math.exp((math.log(by["fox"]["ppl"]) + math.log(by["numbers"]["ppl"])) / 2)  # equal block counts
    assert res["general_ppl"]["value"] == pytest.approx(pooled, rel=1e-6)
    assert res["general_drift_kl"]["value"] == pytest.approx((by["fox"]["drift_kl"] + by["numbers"]["drift_kl"]) / 2)
    assert res["general_ppl"]["n"] == 6 * 15 and len(res["items"]["general_nll@fox"]) == 3

    parts = general_blocks(domains, tok, 16, 3)
    assert all(torch.equal(rep, pack_blocks(load_texts(spec), tok, 16)[:3]) for (rep, _), spec in
               zip(parts.values(), domains.values()))
    config = ForgetlessConfig()
    config.evaluation = dataclasses.replace(cfg, block_length=16, curve_blocks=4)
    config.budget.validation_blocks = 6
    from forgetless.data import load_records

    validator = Validator(config, load_records(suite.task, DataConfig())[:2], tok, model)
    # held out: each domain's blocks after its reported 3, the domains in turn
    fox, numbers = parts["fox"][1], parts["numbers"][1]
    expected = torch.stack([fox[0], numbers[0], fox[1], numbers[1], fox[2], numbers[2]])
    assert torch.equal(validator.blocks, expected)
    assert torch.equal(ForgettingCurve(config, tok).blocks, expected[:4])
    from forgetless.data import held_out_blocks  # the one helper both take them from

    assert torch.equal(held_out_blocks(domains, tok, 16, 3, 6), expected)
    # a text too short to hold any: the curve watches its reported blocks, last first; budget gets none
    assert torch.equal(held_out_blocks({"numbers": str(other)}, tok, 16, 20, 2, fallback=True),
                       pack_blocks(load_texts(str(other)), tok, 16).flip(0)[:2])
    assert len(held_out_blocks({"numbers": str(other)}, tok, 16, 20, 2)) == 0


def test_shipped_general_domains_are_long_enough_and_not_replay(tiny_llama):
    """The packaged yardstick: four domains, none sharing a document with the shipped replay corpus, each with
    its reported blocks and held-out blocks after them."""
    from forgetless.config import GENERAL_DOMAINS
    from forgetless.data import general_blocks

    ev = EvalConfig()
    assert ev.general_text == GENERAL_DOMAINS and len(GENERAL_DOMAINS) >= 4
    check_disjoint(ev, DataConfig(), [], [ReplayConfig()])
    tok = load_tokenizer(tiny_llama)
    for domain, (reported, held) in general_blocks(ev.general_text, tok, ev.block_length, ev.general_blocks).items():
        assert len(reported) == ev.general_blocks and len(held) >= 8, domain


def chain_model(path, ends_after: list[int] = ()):
    """The tiny model with its output rows a permutation of its input embeddings (the role tokens silenced):
    its greedy answers walk chains of distinct tokens (the random model itself repeats one token). With
    `ends_after`, the end-of-sequence row points at those tokens' embeddings: an answer ends after one of them."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        perm = torch.cat([torch.arange(6), 6 + torch.randperm(len(embed) - 6, generator=torch.Generator().manual_seed(0))])
        head = embed[perm].clone()
        head[3:6] = 0
        if ends_after:
            head[1] = 1.5 * embed[list(ends_after)].sum(0)
        model.lm_head.weight = torch.nn.Parameter(head)  # untied from the input embeddings
    return model


def test_instruction_retention_scores_the_base_models_own_answers(tiny_llama, suite, monkeypatch):
    """The base's greedy answers are the reference, generated once for every model compared with it, each scored
    with the end-of-sequence token that ended it; answers cut at the budget are left out and counted; a model
    identical to the base keeps them exactly; a perturbed one finds them less likely."""
    import forgetless.evaluate as ev

    tok = load_tokenizer(tiny_llama)
    eos = tok.eos_token_id
    cfg = dataclasses.replace(suite, task=None, general_text=None, mc=None)
    budget = cfg.instructions_max_new_tokens
    prompts = [ev.render_prompt([{"role": "user", "content": r["instruction"]}], tok, True)
               for _, r in ev.read_rows(cfg.instructions)]
    # the two commonest chains made to end, at different depths; the other answers run past the budget
    walks: list[list[int]] = []
    ev.greedy_answers(chain_model(tiny_llama), tok, prompts, budget, cfg.batch_size, "t", tokens=walks)
    (one, _), (two, _) = collections.Counter(map(tuple, walks)).most_common(2)
    base = chain_model(tiny_llama, ends_after=[one[1], two[3]])

    calls = []
    real = ev.greedy_answers
    monkeypatch.setattr(ev, "greedy_answers", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    own = evaluate(base, tok, cfg, DataConfig())
    twin = evaluate(copy.deepcopy(base), tok, cfg, DataConfig(), base=base)
    assert twin["instr_nll"]["value"] == pytest.approx(own["instr_nll"]["value"], rel=1e-6)  # the base's own value
    assert twin["instr_clean_end"] == own["instr_clean_end"] and twin["instr_base_answers"] == own["instr_base_answers"]
    assert len(calls) == 2 and calls[0] is base  # the base generated once, the twin its own answers
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.2 * torch.randn_like(p))
    moved = evaluate(tuned, tok, cfg, DataConfig(), base=base)
    assert moved["instr_nll"]["value"] > own["instr_nll"]["value"]
    assert len(calls) == 3  # still no second generation of the base's answers
    evaluate(tuned, tok, dataclasses.replace(cfg, instructions_max_new_tokens=budget + 2), DataConfig(), base=base)
    assert len(calls) == 5 and calls[4] is base  # another budget: the base's answers generated again
    other_rows = dataclasses.replace(cfg, generation_batch_size=ev.generation_batch(cfg) + 1)
    evaluate(tuned, tok, other_rows, DataConfig(), base=base)
    assert len(calls) == 7 and calls[6] is base  # other rows per generate call (other padding): generated again

    # by hand, in float64: the base's answers as generated, each ending with its end-of-sequence token
    answers, ended = [], []
    real(base, tok, prompts, budget, cfg.batch_size, "t", ended=ended, tokens=answers)
    finished = [(p, a) for p, a, e in zip(prompts, answers, ended) if e]
    assert all(a[-1] == eos and eos not in a[:-1] for _, a in finished)
    assert all(len(a) == budget and eos not in a for a, e in zip(answers, ended) if not e)
    assert 0 < len(finished) < 40 and len({len(a) for _, a in finished}) > 1  # ended, cut; answers of several lengths
    exact = copy.deepcopy(base).double()
    per_answer, without_end = [], []
    for prompt, answer in finished:
        context = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(exact(input_ids=torch.tensor([context + answer])).logits[0], -1)
        token_logp = [logp[len(context) + j - 1, t].item() for j, t in enumerate(answer)]  # the answer's, eos last
        per_answer.append(-sum(token_logp) / len(answer))
        without_end.append(-sum(token_logp[:-1]) / (len(answer) - 1))
    # only the answers that ended: in their order, each its mean token NLL with the end-of-sequence token
    assert own["items"]["instr_nll"] == pytest.approx(per_answer, abs=1e-5)
    assert own["instr_nll"]["value"] == pytest.approx(sum(per_answer) / len(per_answer), abs=1e-5)
    assert abs(own["instr_nll"]["value"] - sum(without_end) / len(without_end)) > 1e-3  # the ending is scored
    lo, hi = own["instr_nll"]["ci95"]
    assert lo <= own["instr_nll"]["value"] <= hi
    # the cut answers: counted, not scored (the base's answers, alike for every model compared with it)
    assert own["instr_nll"]["n"] == len(finished) and moved["instr_nll"]["n"] == len(finished)
    assert own["instr_base_answers"] == {"scored": len(finished), "cut": 40 - len(finished), "max_new_tokens": budget}
    assert moved["instr_base_answers"] == own["instr_base_answers"]
    assert own["instr_clean_end"]["value"] == pytest.approx(len(finished) / 40)  # the base's own answers


def test_generation_batch_sets_the_rows_per_generate_call_not_the_answers(tiny_llama, suite, monkeypatch):
    """evaluation.generation_batch_size is how many prompts one generate call takes (batch_size when null):
    the answers, and every measure read from them, are the same at one row a call and all rows at once
    (left padding is masked)."""
    import forgetless.evaluate as ev

    tok = load_tokenizer(tiny_llama)
    cfg = dataclasses.replace(suite, general_text=None, mc=None, templates=suite.templates[:2])
    prompts = [ev.render_prompt([{"role": "user", "content": r["instruction"]}], tok, True)
               for _, r in ev.read_rows(cfg.instructions)]
    walks: list[list[int]] = []  # a base whose answers end at different depths (as in the test above)
    ev.greedy_answers(chain_model(tiny_llama), tok, prompts, cfg.instructions_max_new_tokens, 8, "t", tokens=walks)
    (one, _), (two, _) = collections.Counter(map(tuple, walks)).most_common(2)
    base = chain_model(tiny_llama, ends_after=[one[1], two[3]])
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sizes: list[int] = []
    real = ev.greedy_answers
    monkeypatch.setattr(ev, "greedy_answers", lambda m, t, p, n, size, *a, **k: sizes.append(size) or real(m, t, p, n, size, *a, **k))
    generated = {}
    for rows in (None, 1, 40):
        sizes.clear()  # a fresh copy of the base each time: its answers are generated again, not recalled
        res = evaluate(tuned, tok, dataclasses.replace(cfg, generation_batch_size=rows), DataConfig(),
                       base=copy.deepcopy(base))
        assert set(sizes) == {rows or cfg.batch_size} and len(sizes) == 2 + 1 + 1  # templates, own and base answers
        generated[rows] = {k: res["items"][k] for k in ("target_acc", "robust_correct", "instr_nll", "instr_nll_ids",
                                                        "instr_clean_end")}
        generated[rows]["examples"] = res["examples"]
    assert generated[1] == generated[40] == generated[None]
    assert 0 < len(generated[1]["instr_nll"]) < 40  # some answers ended within the budget, some were cut
    with pytest.raises(Exception, match="generation_batch_size"):
        load_config(None, ["evaluation.generation_batch_size=0"])
    # compare's stored evaluations are keyed by it when set; null generates as before it existed: keyed as then
    from forgetless.compare import Suite
    from forgetless.config import ForgetlessConfig, ModelConfig

    keys = [Suite(ForgetlessConfig(model=ModelConfig(name_or_path=tiny_llama),
                                   evaluation=dataclasses.replace(cfg, generation_batch_size=rows)), tiny_llama).key()
            for rows in (None, 64)]
    assert "generation_batch_size" not in keys[0]["evaluation"] and keys[1]["evaluation"]["generation_batch_size"] == 64
