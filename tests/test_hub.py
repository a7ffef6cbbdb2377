"""Models from where users keep them: a Hub id resolves through the local Hugging Face cache (built
here in the cache's own layout, no network), with HF_HUB_OFFLINE set by the user; and importing
forgetless sets nothing process-wide."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from forgetless.errors import ModelError
from forgetless.model import resolve_model_path

from conftest import memorisation_rows, tiny_config, write_jsonl

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(model_dir, cache, repo_id="tiny-org/tiny-llama"):
    """The layout huggingface_hub writes: blobs/, snapshots/<commit>/<files>, refs/main = <commit>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in model_dir.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy2(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_id_resolves_from_the_local_cache(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = hub_cache_with(tiny_llama, tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("tiny-org/tiny-llama") == snapshot
    assert resolve_model_path("tiny-org/tiny-llama", revision=COMMIT) == snapshot
    with pytest.raises(ModelError, match="'other-org/absent' is not a local folder and not in the Hugging Face cache"):
        resolve_model_path("other-org/absent")
@pytest.mark.slow
def test_train_from_a_cached_hub_id_with_user_offline_flag(tiny_llama, tmp_path):
    """End to end in a fresh process, as a user with HF_HUB_OFFLINE=1 and their own HF_HOME runs it;
    the saved adapter names the Hub id (not this machine's cache folder) as its base."""
    hub_cache_with(tiny_llama, tmp_path / "home" / "hub")
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run([sys.executable, "-m", "forgetless.cli", "train", "default",
                          "model.name_or_path=tiny-org/tiny-llama", f"data.train={data}", f"output_dir={tmp_path / 'o'}",
                          "train.max_steps=2", "train.batch_size=2", "train.progress_bar=false", "evaluation.task=null"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-org/tiny-llama"


def clean_environment() -> dict[str, str]:
    """This process's environment less what an earlier import in it may have written (torch sets
    TORCHINDUCTOR_CACHE_DIR once it looks for its compile cache): a child starts from what a user's shell would
    give it, with the user's offline switch on (tests never reach the Hub)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TORCHINDUCTOR_"))}
    return {**env, "HF_HUB_OFFLINE": "1"}


CHANGED = "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"


def test_import_changes_no_environment_variable():
    """Importing forgetless's modules leaves os.environ as it was, though transformers' import of bitsandbytes
    writes TORCHINDUCTOR_CACHE_DIR into it (forgetless.environment)."""
    code = ("import os; before = dict(os.environ)\n"
            "import forgetless, forgetless.train, forgetless.evaluate, forgetless.compare, forgetless.cli\n"
            "import forgetless.budget, forgetless.frontier, forgetless.curve\n" + CHANGED +
            "assert not changed, changed\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_environment(),
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("entry", ["load_base", "train"])
def test_loading_and_training_change_no_environment_variable(entry, tiny_llama, memo_data, tmp_path):
    """Each in a fresh process: loading a model through forgetless.evaluate alone (transformers and peft are
    first imported then, and torch._dynamo while the model loads), and train() (a run's whole life)."""
    config = [f"model.name_or_path={tiny_llama}", f"data.train={memo_data}", f"output_dir={tmp_path / 'o'}",
              "data.max_length=64", "train.max_steps=2", "train.save_steps=1", "train.batch_size=2",
              "train.progress_bar=false"]
    call = {"load_base": "from forgetless.evaluate import load_base\nload_base(config)\n",
            "train": "from forgetless.train import train\ntrain(config)\n"}[entry]
    code = ("import os; before = dict(os.environ)\n"
            "from forgetless.config import load_config\n"
            f"config = load_config(None, {config!r})\n" + call + CHANGED + "assert not changed, changed\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_environment(),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_library_train_leaves_the_allocator_alone(tiny_llama, memo_data, tmp_path, monkeypatch):
    """forgetless.train.train() never applies the process-wide malloc tuning; the CLI does, on a CPU."""
    import forgetless.memory as memory
    from forgetless.cli import main
    from forgetless.train import train

    calls = []
    monkeypatch.setattr(memory, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    train(tiny_config(tiny_llama, memo_data, tmp_path / "lib", max_steps=1))
    assert calls == []
    assert main(["train", "default", f"model.name_or_path={tiny_llama}", f"data.train={memo_data}",
                 f"output_dir={tmp_path / 'cli'}", "train.max_steps=1", "train.progress_bar=false"]) == 0
    assert calls == [1]
