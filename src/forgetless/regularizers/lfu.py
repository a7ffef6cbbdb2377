"""LfU — Learning from the Undesirable (arXiv 2511.13052), as specified in docs/methods/lfu.md.

Per micro-batch (x, y):
  g      = d l_sft / d phi at phi = 0           (from the clean backward SFT needs anyway)
  phi    = alpha * g / (||g||_2 + eps)           (one global norm over all auxiliary tensors)
  l_cons = mean_{layers, response tokens, dims} (stopgrad(h_l(theta)) - h_l(theta, phi))^2
  loss   = l_sft + lam * l_cons                  (grad of l_cons taken at theta+phi, applied to theta)

variant "lora": phi is an offset on the trainable weights (the LoRA matrices in a LoRA run, every
weight in a full fine-tune). After the clean backward has freed its graph, phi is added in place,
the perturbed forward + backward runs, and the exact original values are copied back (the copy
costs one set of trainable weights: tiny for LoRA, 1x the model for full fine-tuning).
variant "reps": phi is one steering vector per decoder layer, added to that layer's output.

Cost: the clean forward/backward is SFT's own; the perturbed forward stops after the last
layer whose consistency is measured (no LM head, no logits) in a single process, then one
backward. The clean graph is freed before the perturbed forward starts.

Cheaper approximations of the same term (issue #18), composable with both variants and `layers`:
  rows  = r < 1: the perturbed pass runs on k = max(1, round(r * B)) of the micro-batch's B rows,
        drawn uniformly without replacement (seeded by train.seed and the micro-batch's index, so a
        resumed run draws the same rows); phi still comes from the whole micro-batch's gradient.
        Rows are independent in a causal LM, so l_cons is a sum of per-row terms c_i and
        (B / k) * sum_{i in S} c_i is an unbiased estimate of sum_i c_i, gradient included.
        (With dropout > 0 the subset's masks are drawn afresh, not replayed from the clean pass.)
  every = k > 1: the perturbed pass runs on micro-batches whose run index u has u % k == 0, its
        term scaled by k; the others take the trainer's additive step (no capture, no isolated backward).
        Averaged over the k phases this is the exact term; it trades cost for gradient variance.
rows = 1.0 and every = 1 are the exact method, bit for bit.

Scale-free options (not in the paper or the spec; issue #29): the paper's alpha and lam were set for
Llama-3.1-8B, and both act in absolute units (a weight-space step of norm alpha; a squared hidden-state
difference per dimension), which mean different things on another model.
  alpha_scale = "weights": ||phi|| = alpha * ||theta|| (the norm of the trainable weights) instead of alpha:
        alpha is a fraction of the weights. lora variant only. In a LoRA run theta is the adapter matrices,
        whose norm follows the rank, the number of adapted modules and the adapters' initialisation (B = 0,
        A random), not the model's size: scale-free in a full fine-tune, a convention in a LoRA one.
  consistency = "relative": each layer's term divided by the clean states' mean squared norm per token
        m_l = mean_t ||h_l,t||^2 (detached) instead of by the hidden size d:
        l_cons = mean_{layers, response tokens} ||h_l(theta) - h_l(theta, phi)||^2 / m_l,
        the shift as a fraction of the representation's own magnitude (the "absolute" form is the same with
        d for m_l). m_l is measured on the pass's own rows: with rows < 1 the term is a ratio estimate (the
        sampled rows' m_l), no longer the unbiased estimate the absolute form is, and under gradient
        accumulation or several processes each micro-batch uses its own m_l.
Logged with every perturbed pass: `lfu_rel_shift` = mean over layers of ||h' - h||_F / ||h||_F over the
pass's response tokens, the perturbation's relative effect on the representations (comparable across sizes).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from forgetless.losses import IGNORE_INDEX
from forgetless.errors import ConfigError, TrainingError
from forgetless.regularizers.base import Regularizer, RunInfo, StepContext
from forgetless.registry import Strength, register
from forgetless.schema import out_of_range

EPS = 1e-12
# half-precision weights: the applied offset must stay this close to phi (else the run is refused)
APPLIED_COSINE_MIN, APPLIED_NORM_TOLERANCE = 0.99, 0.05


@dataclass
class LfUConfig:
    variant: Literal["lora", "reps"] = "lora"
    lam: float = 5.0  # λ, weight of the consistency loss
    alpha: float = 0.1  # α, size of the undesirable step (alpha >= 0.5 collapsed the paper's model)
    # "all", "early" / "middle" / "late" (thirds of the stack), or explicit decoder-layer indices
    layers: str | list[int] = "all"
    rows: float = 1.0  # fraction of each micro-batch's rows the perturbed pass runs on (term scaled by B/k)
    every: int = 1  # run the perturbed pass on every k-th micro-batch only (term scaled by k)
    # scale-free forms (module docstring): alpha as a fraction of the trainable weights' norm ("weights"), and
    # the consistency relative to the clean states' magnitude ("relative"); "absolute": the paper's units
    alpha_scale: Literal["absolute", "weights"] = "absolute"
    consistency: Literal["absolute", "relative"] = "absolute"

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"lam": ">= 0", "alpha": ">= 0"})
        if self.alpha_scale == "weights" and self.variant == "reps":
            found["alpha_scale"] = ("'weights' scales phi by the trainable weights' norm: the lora variant's; RepS "
                                    "steers hidden states (use alpha_scale: absolute, or variant: lora)")
        if isinstance(self.layers, str) and self.layers not in ("all", "early", "middle", "late"):
            found["layers"] = f"expected all, early, middle, late or a list of layer indices, got {self.layers!r}"
        elif isinstance(self.layers, list) and not self.layers:
            found["layers"] = "give at least one decoder-layer index (or all, early, middle, late)"
        if not 0 < self.rows <= 1:
            found["rows"] = f"a fraction of the micro-batch in (0, 1], got {self.rows}"
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            found["every"] = f"a whole number of micro-batches >= 1, got {self.every!r}"
        return found

    def provides(self) -> set[str]:
        return {"perturbs"}  # an extra forward + backward after the clean one (see Regularizer.perturbs)

    def combination_problems(self, others: set[str]) -> dict[str, str]:
        return {"": "at most one perturbing regularizer (lfu) per run"} if "perturbs" in others else {}


class _StopForward(Exception):
    """Raised by a hook after the last layer the perturbed pass needs: the rest is never computed."""


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer stack of any HF causal LM (Llama's `layers`, GPT-2's `h`, ...), also through PEFT."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not candidates:
        raise ConfigError(f"lfu: cannot find the {n_layers} decoder layers of {type(model).__name__}")
    return candidates[0]


def select_layers(spec: str | list[int], n_layers: int) -> list[int]:
    if isinstance(spec, list):
        bad = [i for i in spec if not -n_layers <= i < n_layers]
        if bad or not spec:
            raise ConfigError(f"regularizers.lfu.layers: indices {bad or spec} out of range for {n_layers} layers")
        return sorted({i % n_layers for i in spec})
    third = max(1, n_layers // 3)
    ranges = {
        "all": range(n_layers),
        "early": range(0, third),
        "middle": range(third, n_layers - third) if n_layers > 2 else range(n_layers),
        "late": range(n_layers - third, n_layers),
    }
    if spec not in ranges:
        raise ConfigError(f"regularizers.lfu.layers: expected all|early|middle|late or a list of indices, got {spec!r}")
    return list(ranges[spec])


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _rng_state():
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _cuda_devices()]


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, s in zip(_cuda_devices(), cuda):
        torch.cuda.set_rng_state(s, device)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A norm or sum of sharded weights (FSDP2's DTensors) as one plain tensor (a collective when sharded)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each process's own shard of sharded weights (the tensors themselves when not sharded): an offset added
    to, or a value copied into, identically sharded tensors is local, and DTensor has no in-place foreach copy."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


class LfU(Regularizer):
    name = "lfu"
    perturbs = True

    def __init__(self, cfg: LfUConfig) -> None:
        self.cfg = cfg
        self.layers: nn.ModuleList | None = None
        self.selected: list[int] = []
        self.steering: list[torch.Tensor] = []  # RepS: zero vectors of the clean pass (leaves)
        self.clean_hidden: dict[int, torch.Tensor] = {}
        self.rng_state = None  # set by each clean pass, replayed by the perturbed one
        self.early_stop = True
        self.params: list[torch.Tensor] = []  # LoRA variant: the trainable weights phi offsets
        self.seed = 0  # train.seed: with the micro-batch index, which rows `rows < 1` draws
        self.rows: torch.Tensor | None = None  # the rows the perturbed pass runs on (None: all)
        self.positions: torch.Tensor | None = None  # their response positions, flattened [rows * T]
        self.accelerator = None  # set by setup: the half-precision check is decided by all processes

    def setup(self, run: RunInfo) -> None:
        kind = str(run.accelerator.distributed_type)
        if "FSDP" in kind or "DEEPSPEED" in kind:
            raise ConfigError(f"regularizers.lfu: not supported with {kind} (the ascent step needs the whole trainable "
                              "tensors and their per-micro-batch gradient); use DDP or a single process")
        model = run.accelerator.unwrap_model(run.model)
        self.layers = find_decoder_layers(model)
        self.selected = select_layers(self.cfg.layers, len(self.layers))
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.half_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params)
        self.seed = run.seed
        self.accelerator = run.accelerator
        # Stopping the perturbed forward early leaves later parameters without a gradient, which
        # DDP would wait for; with several processes the whole forward runs (see perturbed_backward).
        self.early_stop = run.accelerator.num_processes == 1

    def perturbs_at(self, micro_step: int) -> bool:
        """Whether micro-batch `micro_step` of the run gets the perturbed pass (`every`)."""
        return micro_step % self.cfg.every == 0

    def _draw_rows(self, batch_size: int, device, micro_step: int) -> torch.Tensor | None:
        """The rows micro-batch `micro_step` of the run perturbs (`rows`; None: all of them)."""
        k = max(1, round(self.cfg.rows * batch_size))
        if k >= batch_size:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step)
        return torch.randperm(batch_size, generator=g)[:k].sort().values.to(device)

    # ------------------------------------------------------------------ clean pass

    @contextlib.contextmanager
    def clean_forward(self, model, batch, micro_step):
        """Capture each selected layer's response-token states (detached: the fixed target)."""
        self.rows = self._draw_rows(batch["input_ids"].shape[0], batch["input_ids"].device, micro_step)
        rows = self.rows
        mask = batch["labels"] != IGNORE_INDEX
        # the response positions of the (sampled) rows, flattened: found once per step (one device sync),
        # then both passes gather with them instead of a boolean index per layer (a sync each)
        self.positions = (mask if rows is None else mask[rows]).flatten().nonzero().squeeze(1)
        positions = self.positions
        self.clean_hidden = {}
        self.steering = []
        # The perturbed pass replays this RNG state, so dropout masks are the same on both sides.
        self.rng_state = _rng_state()

        def hook(index):
            def fn(module, args, output):
                h = _hidden(output)
                if self.cfg.variant == "reps":
                    d = torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device, requires_grad=True)
                    self.steering.append(d)
                    h = h + d
                    output = _replace_hidden(output, h)
                if index in self.selected:
                    kept = h.detach() if rows is None else h.detach()[rows]
                    self.clean_hidden[index] = kept.flatten(0, 1).index_select(0, positions)
                return output
            return fn

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def ascent_tensors(self) -> list[torch.Tensor]:
        if self.cfg.variant == "reps":
            return self.steering
        return self.params

    # ------------------------------------------------------------------ perturbed pass

    def perturbed_backward(self, ctx: StepContext):
        cfg = self.cfg
        # phi from this micro-batch's SFT gradient (read before any backward of ours touches .grad)
        # foreach ops: one kernel launch per op over all (often hundreds of small LoRA) tensors
        grads = [g.detach() for g in ctx.sft_grads]
        norm_dtype = torch.promote_types(grads[0].dtype, torch.float32)  # half-precision norms in fp32
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype)))
        size = cfg.alpha  # the norm phi is given
        if cfg.alpha_scale == "weights":
            weights = [p.detach() for p in self.params]
            size = cfg.alpha * torch.linalg.vector_norm(torch.stack(torch._foreach_norm(weights, 2, dtype=norm_dtype)))
        scale = size / (grad_norm + EPS)
        phi = torch._foreach_mul(grads, scale.to(grads[0].dtype))
        perturb_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(phi, 2, dtype=norm_dtype)))

        input_ids, attention_mask = ctx.batch["input_ids"], ctx.batch["attention_mask"]
        # the estimate's scale: B / k for a row sample, k for every k-th micro-batch (both 1 when exact)
        estimate_scale = float(cfg.every)
        if self.rows is not None:
            estimate_scale *= input_ids.shape[0] / len(self.rows)
            input_ids, attention_mask = input_ids[self.rows], attention_mask[self.rows]
        n_tokens = len(self.positions)
        positions = self.positions
        last = max(self.selected)
        sq_sum = []  # per selected layer: sum over the pass's response tokens of ||h' - h||^2 (in the graph)
        clean_sq = []  # and of ||h||^2 (detached)

        def hook(index):
            def fn(module, args, output):
                h = _hidden(output)
                if cfg.variant == "reps":
                    h = h + phi[index]
                    output = _replace_hidden(output, h)
                if index in self.clean_hidden:
                    picked = h.flatten(0, 1).index_select(0, positions)
                    sq_sum.append(((picked - self.clean_hidden[index]).float() ** 2).sum())
                    clean_sq.append((self.clean_hidden[index].float() ** 2).sum())
                if index == last and self.early_stop:
                    raise _StopForward
                return output
            return fn

        model = ctx.model
        # logits_to_keep=1: only reached without the early stop (several processes), where the head's
        # parameters just need a (zero) gradient for DDP; one position is enough for that.
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        outputs = None
        originals = []
        applied_metrics: dict[str, float] = {}
        if cfg.variant == "lora":
            # theta + phi in place: the clean graph is already freed, so no saved tensor sees it;
            # the exact originals are copied back afterwards (adding and subtracting phi would round).
            if any(isinstance(p, DTensor) and (f.device_mesh, f.placements) != (p.device_mesh, p.placements)
                   for p, f in zip(self.params, phi)):  # a shard-local add is only right between equal layouts
                raise TrainingError("lfu: the ascent gradient is not sharded like the weights it perturbs")
            with torch.no_grad():
                originals = [p.detach().clone() for p in self.params]
                torch._foreach_add_(_local(self.params), _local(phi))
                if self.half_precision:
                    applied_metrics = self._check_applied(originals, phi, perturb_norm)
        try:
            try:
                with torch.random.fork_rng(devices=_cuda_devices()):
                    _set_rng_state(self.rng_state)
                    outputs = model(**kwargs)
            except _StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            hidden_size = self.clean_hidden[last].shape[-1]
            shifts, cleans = torch.stack(sq_sum), torch.stack(clean_sq)
            # mean over layers x dims (relative: over layers, per unit of m_l), and over the step's tokens
            # through token_scale (as l_sft is)
            if cfg.consistency == "relative":
                mean_clean_sq = (cleans / max(n_tokens, 1)).clamp_min(EPS)  # m_l, detached
                cons_sum = (shifts / mean_clean_sq).sum() / len(self.selected)
            else:
                cons_sum = shifts.sum() / (len(self.selected) * hidden_size)
            rel_shift = (shifts.detach().sqrt() / cleans.sqrt().clamp_min(EPS)).mean()
            term = cfg.lam * cons_sum * ctx.token_scale * estimate_scale
            if outputs is not None:
                # Several processes: every parameter must receive a gradient for DDP to sync; a zero one does.
                term = term + 0.0 * outputs.logits.float().mean()
            skipped = not ctx.all_finite(term)
            if skipped:
                # The LfU term is dropped, the clean gradient kept. Several processes: this backward is
                # the one that syncs, so every process still runs it, with a zero term reaching every weight.
                term = 0.0 * sum(p.sum() for p in self.params) if outputs is not None else None
            if term is not None:
                # The gradient of l_cons is taken at theta + phi and accumulates into theta's .grad.
                ctx.backward(term)
        finally:
            if originals:
                with torch.no_grad():
                    torch._foreach_copy_(_local(self.params), _local(originals))
        self.clean_hidden = {}
        self.steering = []

        mean_nll_scale = ctx.token_scale * max(int(ctx.batch["labels"].ne(IGNORE_INDEX).sum()), 1)  # g: whole batch
        if skipped:
            return torch.zeros((), device=cons_sum.device), {"lfu_nonfinite_skipped": 1.0}
        # one read-back for every figure (each .item() is a device sync)
        cons, ascent, perturb, shift = torch.stack([cons_sum.detach().float(), _whole(grad_norm).float(),
                                                    _whole(perturb_norm).float(), rel_shift.float()]).tolist()
        metrics = {
            "l_cons": cons / max(n_tokens, 1),
            "lfu_ascent_grad_norm": ascent / mean_nll_scale if mean_nll_scale else math.nan,
            "lfu_perturb_norm": perturb,
            **({"lfu_rel_shift": shift} if n_tokens else {}),  # no response token: nothing moved or measured
            **applied_metrics,
        }
        return term.detach(), metrics

    def _check_applied(self, originals: list[torch.Tensor], phi: list[torch.Tensor],
                       perturb_norm: torch.Tensor) -> dict[str, float]:
        """Half-precision weights round theta + phi: measure the offset really applied, and refuse to
        train on a perturbation that is not the spec's (with 12.8M bf16 weights, 86% of phi's entries
        rounded away and the applied step's cosine with phi was 0.90). One tensor at a time in float32
        (never a float32 copy of all the weights), read back once."""
        dots, squares = [], []
        for p, o, f in zip(self.params, originals, phi):
            applied = p.float() - o.float()
            dots.append((applied * f.float()).sum())
            squares.append(applied.pow(2).sum())
        dot, sq = _whole(torch.stack(dots).sum()), _whole(torch.stack(squares).sum())  # whole when sharded
        dot, norm_applied, norm_phi = torch.stack([dot, sq.sqrt(), _whole(perturb_norm).float()]).tolist()
        cosine = dot / max(norm_applied * norm_phi, EPS)
        failed = cosine < APPLIED_COSINE_MIN or not abs(norm_applied / max(norm_phi, EPS) - 1) <= APPLIED_NORM_TOLERANCE
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            # each process checks its own phi: all must raise if one does, or the others would wait
            # forever in the next all-reduce for the process that stopped
            flag = torch.tensor([float(failed)], device=perturb_norm.device)
            failed = bool(self.accelerator.gather(flag).max().item())
        if failed:
            for p, o in zip(self.params, originals):
                p.copy_(o)
            dtype = self.params[0].dtype
            raise TrainingError(
                f"lfu: in {str(dtype).replace('torch.', '')} the weights cannot hold the perturbation "
                f"(applied norm {norm_applied:.3g} for alpha {norm_phi:.3g}, cosine {cosine:.3f} with it, "
                "here; every process stops when one fails); "
                "use model.dtype: float32 for full fine-tuning with LfU, or model.finetune: lora")
        return {"lfu_applied_norm": norm_applied, "lfu_applied_cosine": cosine}


register("lfu", LfUConfig, LfU, strength=(
    # no claim to hold the initial model: the term keeps the model consistent with its own perturbed copy and
    # never looks at the initial weights, and on the embedded default the drift rose from lam 0.5 to 20 at every
    # alpha (docs/frontier/lfu-knobs, one seed). A knob to map (`forgetless frontier`), not one `budget` searches
    Strength("lam", (1.0, 5.0, 20.0), holds=None),
    # the undesirable step's size: no monotone claim either (too small and the consistency target is the clean
    # model, too large and the paper's model collapsed at 0.5)
    Strength("alpha", (0.01, 0.03, 0.1, 0.3), range="> 0", holds=None)), presets={
    "lfu": {"regularizers": [{"lfu": {"variant": "lora"}}]},
    "lfu-reps": {"regularizers": [{"lfu": {"variant": "reps"}}]},
    # the cheap approximation (issue #18, bench/lfu_frontier.py): the perturbed pass on half the rows of every
    # 4th micro-batch, the cheapest setting measured (CPU and GPU) whose retention stays inside exact LfU's
    # paired intervals over seeds
    "lfu-fast": {"regularizers": [{"lfu": {"variant": "lora", "rows": 0.5, "every": 4}}]},
})
