"""What fine-tuning gained and what it broke, measured the same way for the base and every tuned model.

Each measure is declared once, in forgetless.stats.MEASURES (its statistic of per-item values, its unit, and
how the report shows it). The suite computes the per-item values and records each measure under its key
(`measure`: the value, a 95% interval over its items and the sample count `n`):
  the task           NLL per answer token of the reference answers of its test split, averaged over answers
                     (each answer counts once; nats); greedy-decoding accuracy with an answer extractor, and
                     across K paraphrased prompt templates (robustness)
  general text       perplexity on held-out general text (never a training or replay source) and mean token
                     KL(base || model) on it (0 for the base itself), pooled and per domain
  instructions       what the model kept of the base's own answers (instruction_retention)
  multiple choice    accuracy by log-likelihood of each choice, the lm-evaluation-harness convention
                     (acc_norm divides by the choice's length in bytes)
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import zlib
import weakref
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from forgetless.data import (check_encodable, end_of_sequence_ids, general_blocks, general_domains,
                             load_records, load_texts, paragraphs, read_rows, render_prompt, task_pairs,
                             uses_chat_template)
from forgetless.config import DEFAULT_TEMPLATES, DataConfig, EvalConfig  # noqa: F401  (re-exported)
from forgetless.replay import replay_documents
from forgetless.sections import SELF, ReplayConfig
from forgetless.errors import ConfigError, DataError, ModelError
from forgetless.generation import complete
from forgetless.losses import forward_rows, token_kl, upcast
from forgetless.model import (default_device, load_model, load_tokenizer, load_trained, read_adapter_config,
                              read_run_model, resolve_model_path)
from forgetless import stats

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- small statistics


def measure(items: dict[str, list], key: str, n: int) -> dict[str, Any]:
    """Measure `key` of forgetless.stats.MEASURES from the per-item values in `items`: its value and 95%
    interval, one statistic of the same items (one model and seed: the interval covers item sampling, not
    training randomness), and the sample count `n`."""
    if key not in stats.MEASURES:  # every recorded measure is one the report knows how to compute and show
        raise KeyError(f"{key!r} is not declared in forgetless.stats.MEASURES")
    entry = stats.value([items], stats.MEASURES[key])
    if entry is None:  # nothing to score
        return {"value": math.nan, "n": n}
    return {"value": entry["value"], "n": n, "ci95": entry["ci95"]}


# ---------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", text.lower()).split()).strip(" .")


def is_correct(generated: str, reference: str, extractor: str) -> bool:
    if extractor == "number":
        found = _NUMBER.findall(generated)
        want = _NUMBER.findall(reference)
        if not found or not want:
            return False
        try:
            return float(found[-1].replace(",", "")) == float(want[-1].replace(",", ""))
        except ValueError:
            return False
    if extractor == "exact":
        return _normalise(generated) == _normalise(reference)
    return _normalise(reference) in _normalise(generated)


# ---------------------------------------------------------------- building blocks


def generation_batch(cfg: EvalConfig) -> int:
    """Rows per generate call: evaluation.generation_batch_size, else batch_size."""
    return cfg.generation_batch_size or cfg.batch_size


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str,
                   ended: list[bool] | None = None, tokens: list[list[int]] | None = None) -> list[str]:
    """Greedy completions of already-rendered prompt texts (left-padded batches). `ended`, when given, is
    filled with whether each answer stopped at end-of-sequence within max_new_tokens; `tokens` with each
    answer's generated token ids, up to and including the end-of-sequence token that ended it (a cut
    answer: all max_new_tokens of them), the decoded text losing that special token."""
    done = complete(model, tokenizer, prompts, max_new_tokens, batch_size, desc=desc)
    if ended is not None:
        ended[:] = [c.ended for c in done]
    if tokens is not None:
        tokens[:] = [c.ids for c in done]
    return [c.text for c in done]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, desc: str) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) pair."""
    return token_logprobs(model, tokenizer, [(tokenizer(context, add_special_tokens=False)["input_ids"],
                                              tokenizer(continuation, add_special_tokens=False)["input_ids"])
                                             for context, continuation in pairs], batch_size, desc)


@torch.no_grad()
def token_logprobs(model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                   desc: str) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) pair of token ids (a
    continuation may end with a special token, e.g. end-of-sequence, that a decoded text would lose)."""
    rows = [(list(ctx_ids) + list(cont_ids), len(ctx_ids)) for ctx_ids, cont_ids in pairs]
    scores: list[float] = [0.0] * len(rows)
    pad = tokenizer.pad_token_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths batch together
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        index = order[start:start + batch_size]
        chunk = [rows[i] for i in index]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        keep = torch.zeros_like(ids, dtype=torch.bool)  # positions that predict a continuation token
        targets = []
        for i, (seq, n_ctx) in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            keep[i, n_ctx - 1: len(seq) - 1] = True
            targets += seq[n_ctx:]
        _, logits = forward_rows(model, ids.to(model.device), mask.to(model.device), keep.to(model.device))
        logp = torch.log_softmax(upcast(logits), dim=-1)
        token_logp = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)]
        for i, part in zip(index, token_logp.split([len(seq) - n_ctx for seq, n_ctx in chunk])):
            scores[i] = part.sum().item()
    return scores


@torch.no_grad()
def choice_logprobs(model, tokenizer, questions: list[tuple[list[int], list[list[int]]]], batch_size: int,
                    desc: str) -> list[list[float]]:
    """Sum of log p(choice | context) for each choice of each (context ids, [choice ids, ...]) question: the
    same figures as token_logprobs on every (context, choice) pair (to float rounding), with each context run
    once instead of once per choice. Contexts run `batch_size` at a time, left-padded so each ends at the last
    position, whose logits score every choice's first token; their key/value cache is then copied for the
    choices' other tokens, `batch_size` rows at a time sorted by length (a row's position ids continue its own
    context's). On the embedded default's MMLU sample 9,611 tokens run instead of 25,871, in 0.58-0.60x the
    time (bench/mc_shared_context.py: padding the choices to their batch's longest costs the rest). A model
    whose cache cannot be copied and selected row by row (not a transformers Cache), or one with a sliding
    attention window shorter than the longest row (or a cache layer other than plain keys and values), is scored
    pair by pair. A non-finite score is a ModelError, not a pick."""
    scores: list[list[float]] = [[0.0] * len(choices) for _, choices in questions]

    def pair_by_pair(indices: list[int]) -> None:
        flat = iter(token_logprobs(model, tokenizer, [(questions[q][0], c) for q in indices for c in questions[q][1]],
                                   batch_size, f"{desc} (pair by pair)"))
        for q in indices:
            scores[q] = [next(flat) for _ in questions[q][1]]

    window = getattr(getattr(model, "config", None), "sliding_window", None)
    longest = max((len(ctx) + max(map(len, choices)) for ctx, choices in questions), default=0)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(questions)), key=lambda q: len(questions[q][0]))  # similar lengths batch together
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if isinstance(window, int) and longest > window:  # a sliding layer's cache keeps only the window's last tokens
        pair_by_pair(order)
        groups = []
    for group in tqdm(groups, desc=desc, leave=False):
        contexts = [questions[q][0] for q in group]
        width = max(len(ids) for ids in contexts)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context)
            mask[row, width - len(context):] = 1
        ids, mask = ids.to(device), mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        # only plain key/value layers are copied and continued: a sliding or chunked layer keeps only its window,
        # a recurrent one's state would have read the left padding
        if not hasattr(cache, "batch_select_indices") or any(type(layer).__name__ != "DynamicLayer"
                                                             for layer in getattr(cache, "layers", [])):
            pair_by_pair(group)
            continue
        first = torch.log_softmax(upcast(out.logits[:, -1]), dim=-1)  # [group, V]: each choice's first token
        # (row in the group, question, choice index) of every choice with tokens after its first
        rest = sorted(((row, q, c) for row, q in enumerate(group) for c, choice in enumerate(questions[q][1])),
                      key=lambda t: len(questions[t[1]][1][t[2]]))
        for row, q, c in rest:
            scores[q][c] = first[row, questions[q][1][c][0]].item()
        rest = [t for t in rest if len(questions[t[1]][1][t[2]]) > 1]
        for sub in range(0, len(rest), batch_size):
            chunk = rest[sub:sub + batch_size]
            # a choice's tokens but its last, which nothing after it predicts from
            inputs = [questions[q][1][c][:-1] for _, q, c in chunk]
            span = max(len(x) for x in inputs)
            c_ids = torch.full((len(chunk), span), pad, dtype=torch.long)
            c_mask = torch.zeros_like(c_ids)
            for i, x in enumerate(inputs):
                c_ids[i, : len(x)] = torch.tensor(x)
                c_mask[i, : len(x)] = 1
            rows = torch.tensor([row for row, _, _ in chunk], device=device)
            copied = copy.deepcopy(cache)
            copied.batch_select_indices(rows)
            c_ids, c_mask = c_ids.to(device), c_mask.to(device)
            positions = mask[rows].sum(-1, keepdim=True) + torch.arange(span, device=device)
            _, logits = forward_rows(model, c_ids, torch.cat([mask[rows], c_mask], dim=-1), c_mask.bool(),
                                     use_cache=True, position_ids=positions, past_key_values=copied)
            targets = [t for _, q, c in chunk for t in questions[q][1][c][1:]]
            token_logp = torch.log_softmax(upcast(logits), dim=-1)[torch.arange(len(targets)),
                                                                   torch.tensor(targets, device=device)]
            for (_, q, c), part in zip(chunk, token_logp.split([len(x) for x in inputs])):
                scores[q][c] += part.sum().item()
    broken = [q for q, per_choice in enumerate(scores) if not all(map(math.isfinite, per_choice))]
    if broken:  # a pick among NaNs would be arbitrary
        raise ModelError(f"multiple choice: the model gives non-finite log-probabilities to the choices of question "
                         f"{broken[0] + 1} (and {len(broken) - 1} more): its weights or logits overflow; evaluate it "
                         "in float32 (model.dtype=float32)")
    return scores


@torch.no_grad()
def block_nll_and_drift(model, blocks: torch.Tensor, batch_size: int, base=None) -> tuple[list[float], list[float], int]:
    """Per-block mean NLL and (with `base`) per-block mean token KL(base || model)."""
    nll, drift = [], []
    for start in tqdm(range(0, len(blocks), batch_size), desc="general text", leave=False):
        ids = blocks[start:start + batch_size].to(model.device)
        logits = upcast(model(input_ids=ids).logits)[:, :-1]
        logp = torch.log_softmax(logits, dim=-1)
        nll += (-logp.gather(-1, ids[:, 1:, None]).squeeze(-1)).mean(-1).tolist()
        if base is not None:
            ref = upcast(base(input_ids=ids.to(base.device)).logits)[:, :-1].to(logits.device)
            drift += token_kl(logits.flatten(0, 1), ref.flatten(0, 1)).view(ids.shape[0], -1).mean(-1).tolist()
    return nll, drift, blocks.shape[1] - 1


def load_mc(spec: str, limit: int) -> list[dict]:
    """Multiple-choice rows {question: str, choices: [str, ...], answer: index into choices}."""
    rows = []
    for where, row in read_rows(spec):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a multiple-choice row is an object with 'question', 'choices' (list) and "
                            f"'answer' (index), got {type(row).__name__}")
        for field in ("question", "choices", "answer"):
            if row.get(field) is None:
                raise DataError(f"{where}: missing field '{field}' (a multiple-choice row needs 'question', "
                                "'choices' (list) and 'answer' (index))")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string, got {row['question']!r:.60}")
        choices = row["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a non-empty list of strings (the answer texts), "
                            f"got {choices!r:.60}")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer' must be the index of the correct choice, an integer from 0 "
                            f"to {len(choices) - 1}, got {answer!r:.60}")
        for i, text in enumerate([row["question"], *choices]):
            check_encodable(text, f"{where}: field " + (f"'choices'[{i - 1}]" if i else "'question'"))
        rows.append(row)
        if len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{spec}: no multiple-choice rows found (the file is empty)")
    return rows


# ---------------------------------------------------------------- the suite


def check_disjoint(cfg: EvalConfig, data_cfg: DataConfig, train_specs: list[str], replays: list[ReplayConfig]) -> None:
    """Never evaluate on what was trained on: task prompts vs training prompts, general text vs replay text,
    self-replay prompts (`self_prompts`, answered by the model and trained on) vs the task's test prompts and
    the everyday instructions whose answers instruction retention scores."""
    test = {r.messages[-2]["content"] for r in load_records(cfg.task, data_cfg)} if cfg.task else set()
    asked = {" ".join(row["instruction"].split()) for _, row in read_rows(cfg.instructions)
             if isinstance(row, dict) and isinstance(row.get("instruction"), str)} if cfg.instructions else set()
    for replay in replays:
        if replay.data == SELF and replay.self_prompts:
            prompts = {" ".join(line.split()) for line in Path(replay.self_prompts).read_text(encoding="utf-8").splitlines()
                       if line.strip()}
            shared = prompts & ({" ".join(t.split()) for t in test} | asked)
            if shared:
                raise DataError(f"replay.self_prompts ({replay.self_prompts}): {len(shared)} prompts are also asked by "
                                f"the evaluation (e.g. {next(iter(shared))!r:.80}); the model would rehearse its own "
                                "answers to them; remove them")
    if cfg.task:
        for spec in train_specs:
            seen = {r.messages[-2]["content"] for r in load_records(spec, data_cfg)}
            overlap = test & seen
            if overlap:
                raise DataError(f"eval.task: {len(overlap)} test prompts also appear in the training data {spec} "
                                f"(e.g. {next(iter(overlap))!r}); evaluate on held-out data")
    replayed = [(replay, paragraphs(replay_documents(replay, data_cfg))) for replay in replays]  # each read once
    for domain, general_spec in general_domains(cfg.general_text).items():
        general = paragraphs(load_texts(general_spec))
        for replay, replayed_paragraphs in replayed:
            shared = general & replayed_paragraphs
            if shared:
                raise DataError(f"evaluation.general_text ({domain}: {general_spec}) shares {len(shared)} paragraphs "
                                f"with the replay corpus {replay.data} (e.g. {next(iter(shared))[:60]!r}); use another "
                                "source")


def evaluate(model, tokenizer, cfg: EvalConfig, data_cfg: DataConfig, base=None, name: str = "model") -> dict[str, Any]:
    """Run the suite on `model` (and drift against `base`, when given). Deterministic given the seed."""
    model.eval()
    torch.manual_seed(cfg.seed)
    results: dict[str, Any] = {}
    items: dict[str, list[float]] = {}  # per-item values, for paired comparisons between models
    chat = uses_chat_template(tokenizer, data_cfg)

    if cfg.task:
        records = load_records(cfg.task, data_cfg)[: cfg.task_limit]
        # target NLL of the reference answers, with the training template
        pairs, answers = task_pairs(records, tokenizer, data_cfg)
        scores = continuation_logprobs(model, tokenizer, pairs, cfg.batch_size, f"{name}: task NLL")
        lengths = [len(answer) for answer in answers]
        items["target_nll"] = [-s / n for s, n in zip(scores, lengths)]  # per answer: its mean token NLL
        results["target_nll"] = measure(items, "target_nll", len(records))
        per_template, correct_by_template = [], []
        for t, template in enumerate(cfg.templates):
            prompts = []
            for r in records:
                messages = [dict(m) for m in r.messages[:-1]]
                messages[-1]["content"] = template.format(prompt=messages[-1]["content"])
                prompts.append(render_prompt(messages, tokenizer, chat))
            answers = greedy_answers(model, tokenizer, prompts, cfg.max_new_tokens, generation_batch(cfg),
                                     f"{name}: task template {t + 1}/{len(cfg.templates)}")
            correct = [float(is_correct(a, r.messages[-1]["content"], cfg.extractor)) for a, r in zip(answers, records)]
            per_template.append(sum(correct) / len(correct))
            correct_by_template.append(correct)
            if t == 0:
                items["target_acc"] = correct
                results["target_acc"] = measure(items, "target_acc", len(records))
                results["examples"] = [{"prompt": p, "answer": a} for p, a in zip(prompts[:3], answers[:3])]
        items["robust_correct"] = [list(row) for row in zip(*correct_by_template)]  # [question][template]
        # the mean over templates, and the spread of the templates' accuracies beyond question noise (forgetless.stats)
        results["robust_acc_mean"] = measure(items, "robust_acc_mean", len(records) * len(per_template))
        results["robust_acc_std"] = measure(items, "robust_acc_std", len(per_template))
        results["robust_acc_per_template"] = per_template

    if cfg.general_text:
        # every domain's reported blocks; pooled figures weigh each block alike, per-domain ones beside them
        nll, drift, by_domain = [], [], {}
        for domain, (blocks, _) in general_blocks(cfg.general_text, tokenizer, cfg.block_length, cfg.general_blocks).items():
            d_nll, d_drift, tokens = block_nll_and_drift(model, blocks, cfg.batch_size, base)
            d_drift = d_drift if base is not None else [0.0] * len(d_nll)
            by_domain[domain] = {"ppl": math.exp(sum(d_nll) / len(d_nll)), "drift_kl": sum(d_drift) / len(d_drift),
                                 "blocks": len(d_nll), "tokens": len(d_nll) * tokens}
            nll, drift = nll + d_nll, drift + d_drift
            items[f"general_nll@{domain}"], items[f"general_drift_kl@{domain}"] = d_nll, d_drift
        items["general_nll"], items["general_drift_kl"] = nll, drift
        n_tokens = sum(d["tokens"] for d in by_domain.values())
        # intervals over contiguous groups of blocks (consecutive blocks of a text are not independent)
        results["general_ppl"] = measure(items, "general_ppl", n_tokens)
        results["general_drift_kl"] = measure(items, "general_drift_kl", n_tokens)  # the base's: 0 [0, 0]
        results["general_by_domain"] = by_domain

    if cfg.instructions:
        results.update(instruction_retention(model, tokenizer, cfg, data_cfg, base, name, items))

    if cfg.mc:
        rows = load_mc(cfg.mc, cfg.mc_limit)
        questions = [(tokenizer(f"Question: {row['question'].strip()}\nAnswer:", add_special_tokens=False)["input_ids"],
                      tokenizer([f" {c}" for c in row["choices"]], add_special_tokens=False)["input_ids"]) for row in rows]
        scores = choice_logprobs(model, tokenizer, questions, cfg.batch_size, f"{name}: multiple choice")
        acc, acc_norm = [], []
        for row, s in zip(rows, scores):
            k = len(row["choices"])
            norm = [v / max(len(c.encode("utf-8")) + 1, 1) for v, c in zip(s, row["choices"])]
            acc.append(float(max(range(k), key=lambda j: s[j]) == row["answer"]))
            acc_norm.append(float(max(range(k), key=lambda j: norm[j]) == row["answer"]))
        items["mc_acc"], items["mc_acc_norm"] = acc, acc_norm
        results["mc_acc"] = measure(items, "mc_acc", len(acc))
        results["mc_acc_norm"] = measure(items, "mc_acc_norm", len(acc_norm))
    if cfg.lm_eval_tasks:
        results["lm_eval"] = run_lm_eval(model, tokenizer, cfg)
    results["items"] = items
    return results


def run_lm_eval(model, tokenizer, cfg: EvalConfig) -> dict[str, Any]:
    """lm-evaluation-harness on the model in memory (its HFLM wrapper; nothing is re-implemented):
    task -> {metric: value} plus the sample count, as lm_eval reports them."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("evaluation.lm_eval_tasks: needs lm-evaluation-harness; "
                          "pip install 'forgetless[lm-eval]' (or leave lm_eval_tasks empty)") from None
    if cfg.lm_eval_include and not os.path.isdir(cfg.lm_eval_include):
        raise ConfigError(f"evaluation.lm_eval_include: {cfg.lm_eval_include} is not a folder of task YAML files")
    # a PEFT model's base model carries the injected adapters: the tuned network, as a transformers model
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = HFLM(pretrained=network, tokenizer=tokenizer, batch_size=cfg.batch_size)
    manager = TaskManager(include_path=cfg.lm_eval_include)
    unknown = [t for t in cfg.lm_eval_tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"evaluation.lm_eval_tasks: lm_eval knows no task {unknown[0]!r} "
                          "(define it in a YAML file under evaluation.lm_eval_include)")
    out = simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks), task_manager=manager, limit=cfg.lm_eval_limit,
                          num_fewshot=cfg.lm_eval_num_fewshot, log_samples=False, bootstrap_iters=cfg.bootstrap,
                          random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                          fewshot_random_seed=cfg.seed)
    samples = out.get("n-samples", {})
    return {task: {**{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"},
                   "n": samples.get(task, {}).get("effective")}
            for task, metrics in out["results"].items()}


# the base model's greedy answers to the instructions (token ids, each up to and including the end-of-sequence
# token that ended it, and whether it ended), per base model (dropped with it) and (instructions, budget,
# prompts, end-of-sequence ids, rows per generate call: padding changes the arithmetic, so a near tie may go
# another way): generated once however many tuned models are compared with it
_BASE_ANSWERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def base_answers(base) -> list[list]:
    """The base's instruction answers generated so far in this process, as JSON-ready entries
    [instructions, max_new_tokens, prompts, end-of-sequence ids, answers' tokens, ended, rows per generate call]
    (compare stores them beside the base's evaluation, so a worker process, or a later comparison, need not
    generate them again)."""
    return [[spec, budget, list(prompts), list(ends), tokens, ended, batch]
            for (spec, budget, prompts, ends, batch), (tokens, ended) in _BASE_ANSWERS.get(base, {}).items()]


def know_base_answers(base, entries: list[list], batch: int) -> None:
    """Take `entries` (as base_answers returns them) as the base's answers: instruction_retention reuses
    an entry whose instructions, budget, rendered prompts, end-of-sequence ids and rows per generate call are
    its own. `batch`: the rows per call of an entry stored before entries recorded it (compare's file is keyed
    by the suite, whose generation batch it was)."""
    known = _BASE_ANSWERS.setdefault(base, {})
    for spec, budget, prompts, ends, tokens, ended, *stored_batch in entries:
        known.setdefault((spec, budget, tuple(prompts), tuple(ends), stored_batch[0] if stored_batch else batch),
                         (tokens, ended))


def instruction_retention(model, tokenizer, cfg: EvalConfig, data_cfg: DataConfig, base, name: str,
                          items: dict) -> dict[str, Any]:
    """How much of the base model's own behaviour on everyday instructions the model kept.

    `instr_nll` (nats; the base's own value is the reference): the NLL per token of the base's greedy answers
    under this model, averaged over answers, each answer's tokens as the base generated them plus the
    end-of-sequence token that ended it. A rise means the model finds the base's own complete answers,
    their ending included, less likely: it drifted from the base's behaviour on everyday instructions.
    Cut answers, the base's still running at `instructions_max_new_tokens` (mostly loops that never end),
    have no ending to score: left out of `instr_nll` (a model more peaked on truncated text would look as
    if it kept them) and counted in `instr_base_answers` (`scored`: instr_nll's n; `cut`).
    `instr_clean_end`: the share of this model's own greedy answers that end at end-of-sequence within the
    budget."""
    rows = [row for _, row in read_rows(cfg.instructions)]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise DataError(f"{cfg.instructions}: row {i + 1} needs a non-empty 'instruction' string")
    chat = uses_chat_template(tokenizer, data_cfg)
    prompts = [render_prompt([{"role": "user", "content": row["instruction"]}], tokenizer, chat) for row in rows]
    own_ended: list[bool] = []
    own_tokens: list[list[int]] = []
    greedy_answers(model, tokenizer, prompts, cfg.instructions_max_new_tokens, generation_batch(cfg),
                   f"{name}: instructions", ended=own_ended, tokens=own_tokens)
    known = _BASE_ANSWERS.setdefault(base if base is not None else model, {})
    key = (cfg.instructions, cfg.instructions_max_new_tokens, tuple(prompts), tuple(end_of_sequence_ids(model, tokenizer)),
           generation_batch(cfg))
    if base is None:
        known[key] = own_tokens, own_ended
    if key not in known:
        base_ended: list[bool] = []
        base_tokens: list[list[int]] = []
        greedy_answers(base, tokenizer, prompts, cfg.instructions_max_new_tokens, generation_batch(cfg),
                       f"{name}: base answers", ended=base_ended, tokens=base_tokens)
        known[key] = base_tokens, base_ended
    answers, ended = known[key]
    scored = [i for i, e in enumerate(ended) if e]  # answers that ended on their own, with their ending
    pairs = [(tokenizer(prompts[i], add_special_tokens=False)["input_ids"], answers[i]) for i in scored]
    scores = token_logprobs(model, tokenizer, pairs, cfg.batch_size, f"{name}: base answers' NLL")
    items["instr_nll"] = [-s / len(a) for s, (_, a) in zip(scores, pairs)]  # per answer: its mean token NLL
    # which answers they are (the instruction and a digest of the base answer's tokens): models whose base answers
    # were generated apart (compare --jobs) are paired on the answers they share, never one text with another
    items["instr_nll_ids"] = [f"{i}:{zlib.crc32(str(answers[i]).encode()):08x}" for i in scored]
    items["instr_clean_end"] = [float(e) for e in own_ended]
    return {
        "instr_nll": measure(items, "instr_nll", len(pairs)),  # no answer that ended to score: NaN, not a figure
        "instr_clean_end": measure(items, "instr_clean_end", len(own_ended)),
        # the base's answers, alike for every model compared with it (a record, not a measure of this model)
        "instr_base_answers": {"scored": len(pairs), "cut": len(prompts) - len(pairs),
                               "max_new_tokens": cfg.instructions_max_new_tokens},
    }


def load_base(config):
    """The config's base model (eval mode, on the run's device) and its tokenizer."""
    path = resolve_model_path(config.model.name_or_path, config.model.revision)
    base = load_model(config.model, path, device=default_device()).eval()
    return base, load_tokenizer(path)


# layers whose LoRA update merged into a weight tied between the input and output embeddings would change both
# (peft only warns): a run adapting one of these is evaluated unmerged (always right, merely slower)
EMBEDDING_LAYERS = {"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings"}


def merges_for_evaluation(out_dir: str | Path, dtype: torch.dtype) -> bool:
    """Whether evaluate_run folds the folder's LoRA adapters into its base's weights before the suite: only a
    float32 base (in half precision W + BA is rounded to W's precision, which loses most of a small update),
    only unquantised (QLoRA's 4/8-bit weights hold no exact sum), only a plain LoRA adapter on named layers that
    are not embeddings or the LM head, with no whole modules saved beside it. The same model with one matmul per
    layer instead of three: 0.93x the suite's time on the embedded default (bench/eval_merge.py); figures equal
    to float32 rounding, so the stored evaluation's key records it (forgetless.compare.Suite.run_key). Decided
    from the folder's files alone, so the key is known before the model is loaded."""
    folder = Path(out_dir)
    if dtype != torch.float32 or not (folder / "adapter_config.json").is_file():
        return False
    adapter = read_adapter_config(folder)
    targets, saved_whole = adapter.get("target_modules"), adapter.get("modules_to_save")
    if (adapter.get("peft_type") != "LORA" or not isinstance(targets, list) or saved_whole
            or any(name.split(".")[-1] in EMBEDDING_LAYERS for name in targets)):
        return False
    return not (read_run_model(folder) or {}).get("quantization")


def evaluate_run(config, base, tokenizer, out_dir: str, name: str) -> dict[str, Any]:
    """The suite on one fine-tuned output folder, with drift measured against `base`."""
    # in the base model's precision, so drift measures training, not a change of dtype
    model, _ = load_trained(out_dir, dtype=base.dtype, device=default_device())
    if merges_for_evaluation(out_dir, base.dtype):
        model = model.merge_and_unload()
    results = evaluate(model.eval(), tokenizer, config.evaluation, config.data, base=base, name=name)
    del model
    return results


def evaluate_base_and_runs(config, runs: dict[str, str]) -> dict[str, Any]:
    """The suite on the config's base model and on each fine-tuned output folder in `runs`
    (name -> folder), with drift measured against the base. Returns name -> results."""
    base, tokenizer = load_base(config)
    results = {"base": evaluate(base, tokenizer, config.evaluation, config.data, name="base")}
    for name, out_dir in runs.items():
        results[name] = evaluate_run(config, base, tokenizer, out_dir, name)
    return results
