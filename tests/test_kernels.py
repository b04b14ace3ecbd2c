"""The optional training fast paths (`minigpt/kernels/loss.py`) compute what the plain paths do.

- the fused head + cross-entropy (`fused_linear_nll_sum`): in-place softmax in a reused buffer, the
  last chunk's gradient products deferred to the backward pass, -log(p) with an exact fallback for tiny p;
  held to the plain path in float32 (atol 1e-5) and under bf16 autocast;
- which loss `GPT.loss_kernel="auto"` picks;
- the fused Adam/AdamW that `LitMiniGPT.configure_optimizers` picks;
- `scripts/bench_train.py` at a tiny size: what the benchmark promises (same shapes, same optimizer);
- the decode step's fast paths (`minigpt/kernels/decode_step.py`): the lean one-token trunk equals
  `GPT.hidden_states` with a KV cache (every flavour, left-padded rows, bf16 autocast), the chunked argmax
  equals `argmax` (ties, NaN, -inf), `one_thread` restores the thread count, and "auto" keeps the
  contender with the lowest median time, measured once.
"""

import copy
import dataclasses
import functools
import json
import math
import pickle

import pytest
import torch
from script_loader import load_script

import minigpt.model
from minigpt.cache import KVCache
from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.kernels import decode_step as decode_steps
from minigpt.kernels.decode_step import (
    chunked_argmax,
    decode_trunk,
    greedy_pick,
    one_thread,
    one_token_hidden,
    resolve_pick,
    resolve_trunk,
)
from minigpt.kernels.loss import LOSS_CHUNK_ELEMENTS, chunk_rows
from minigpt.lit_module import LitMiniGPT
from minigpt.model import GPT, lm_loss

IGNORE = -100


def tiny_model(loss_kernel: str = "fused", **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=48, block_size=12, **overrides), loss_kernel=loss_kernel)


def batch(seed: int = 1, B: int = 4, T: int = 12, V: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 7:] = IGNORE  # padding at the end of one row
    targets[2, 3] = IGNORE  # a context-only position
    return idx, targets


def plain_loss_and_grads(model: GPT, idx, targets):
    params = list(model.parameters())
    loss = lm_loss(model(idx), targets, ignore_index=IGNORE)
    return loss, torch.autograd.grad(loss, params)


def assert_same_loss_and_grads(model: GPT, idx, targets, **loss_kw) -> None:
    plain, plain_grads = plain_loss_and_grads(model, idx, targets)
    fast = model.loss(idx, targets, ignore_index=IGNORE, **loss_kw)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    for (name, _), g_plain, g_fast in zip(model.named_parameters(), plain_grads, fast_grads):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(), id="bias"),
        pytest.param(dict(tie_weights=True, lm_head_bias=False, norm_first=True), id="tied-nobias"),
    ],
)
@pytest.mark.parametrize(
    "chunk_size",
    [
        pytest.param(None, id="one-chunk"),  # the default at this size: everything deferred to backward
        pytest.param(7, id="equal-chunks"),  # 42 counted rows -> 6 chunks of 7
        pytest.param(5, id="uneven-last"),  # 42 rows -> 9 chunks of 5, the last one shorter
        pytest.param(1, id="row-by-row"),
    ],
)
def test_fused_head_loss_and_gradients_equal_plain_path(overrides, chunk_size):
    model = tiny_model(**overrides)
    idx, targets = batch()
    assert_same_loss_and_grads(model, idx, targets, chunk_size=chunk_size)


def test_fused_head_scales_gradients_by_the_upstream_gradient():
    # The backward pass folds the upstream gradient into its products: check a scale other than 1/count.
    model = tiny_model()
    idx, targets = batch(seed=3)
    params = list(model.parameters())
    logits = model(idx)
    ref = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    ref_grads = torch.autograd.grad(ref * 0.37, params)
    for chunk_size in (None, 5):
        nll_sum, _ = model.loss_sum_and_count(idx, targets, ignore_index=IGNORE, chunk_size=chunk_size)
        torch.testing.assert_close(nll_sum, ref, atol=1e-4, rtol=1e-6)
        grads = torch.autograd.grad(nll_sum * 0.37, params)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_fused_head_is_exact_when_the_target_probability_underflows():
    # Huge head weights make some target probabilities far below float32's normal range (loss >> 87 nats):
    # -log(p) would be inf there, so those rows must be recomputed through log_softmax.
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)
    idx, targets = batch(seed=5)
    plain, plain_grads = plain_loss_and_grads(model, idx, targets)
    assert plain.item() > 100  # the mean is dominated by rows whose target probability underflows
    for chunk_size in (None, 5):
        fast = model.loss(idx, targets, ignore_index=IGNORE, chunk_size=chunk_size)
        assert torch.isfinite(fast)
        torch.testing.assert_close(fast, plain, atol=1e-3, rtol=1e-6)
        # Gradients are in the hundreds here: compare them relative to their size.
        grads = torch.autograd.grad(fast, list(model.parameters()))
        for g, r in zip(grads, plain_grads):
            torch.testing.assert_close(g, r, atol=1e-5 * max(1.0, r.abs().max().item()), rtol=0)


def test_no_grad_path_gives_the_same_loss_and_keeps_the_buffer():
    model = tiny_model()
    idx, targets = batch()
    plain, _ = plain_loss_and_grads(model, idx, targets)
    with torch.no_grad():
        first = model.loss(idx, targets, ignore_index=IGNORE)
        ptr = model._loss_workspace._buffer.data_ptr()
        second = model.loss(idx, targets, ignore_index=IGNORE, chunk_size=5)
    torch.testing.assert_close(first, plain.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(second, plain.detach(), atol=1e-5, rtol=0)
    assert model._loss_workspace._buffer.data_ptr() == ptr  # reused, not reallocated


def test_two_pending_losses_never_share_the_buffer():
    # Two forward passes before one backward (e.g. summing two batches' losses): each keeps its own buffer.
    model = tiny_model()
    (a_idx, a_t), (b_idx, b_t) = batch(seed=1), batch(seed=2)
    params = list(model.parameters())
    fast = model.loss(a_idx, a_t, ignore_index=IGNORE) + model.loss(b_idx, b_t, ignore_index=IGNORE)
    fast_grads = torch.autograd.grad(fast, params)
    plain = lm_loss(model(a_idx), a_t, ignore_index=IGNORE) + lm_loss(model(b_idx), b_t, ignore_index=IGNORE)
    plain_grads = torch.autograd.grad(plain, params)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    for g_fast, g_plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=0)


def test_second_backward_through_the_loss_is_refused_clearly():
    model = tiny_model()
    idx, targets = batch()
    loss = model.loss(idx, targets, ignore_index=IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated only once"):
        loss.backward()


def test_buffer_is_not_copied_or_pickled_with_the_model():
    model = tiny_model()
    idx, targets = batch()
    with torch.no_grad():
        model.loss(idx, targets, ignore_index=IGNORE)
    assert model._loss_workspace._buffer is not None
    assert copy.deepcopy(model)._loss_workspace._buffer is None
    assert pickle.loads(pickle.dumps(model))._loss_workspace._buffer is None
    assert not any("workspace" in k for k in model.state_dict())


def test_chunks_are_equal_and_never_above_the_limit():
    for n in (1, 5, 42, 960, 4096, 10_001):
        for limit in (1, 5, 7, 1024, 1341):
            rows = chunk_rows(n, limit)
            chunks = -(-n // rows)
            assert rows <= limit and chunks == -(-n // limit)  # as few chunks as the limit allows ...
            assert n - (chunks - 1) * rows > rows - chunks  # ... and a last chunk about as long as the others
    # The tutorial's batch (32 x 30 rows at a 100,000-word vocabulary) fits the fused kernel's one buffer.
    assert LOSS_CHUNK_ELEMENTS // 100_000 >= 32 * 30


# -- optimizer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_configured_optimizer_is_fused_on_cpu_and_steps_like_plain_adam(optimizer):
    torch.manual_seed(0)
    lit = LitMiniGPT(GPTConfig.tiny(vocab_size=48, block_size=12), optimizer=optimizer, lr=1e-2, weight_decay=0.01)
    reference = copy.deepcopy(lit)
    opt = lit.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    # The plain optimizer with the same settings and parameter groups, PyTorch's default implementation.
    by_name = dict(reference.named_parameters())
    names = {id(p): n for n, p in lit.named_parameters()}
    plain_groups = [
        {k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}
        | {"params": [by_name[names[id(p)]] for p in g["params"]]}
        for g in opt.param_groups
    ]
    plain = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(plain_groups, foreach=False)
    for step in range(3):
        # The same gradients for both (from the plain model): a gradient that is zero up to rounding noise,
        # like the key bias's, would otherwise make Adam's normalised updates differ by up to lr.
        idx, targets = batch(seed=step)
        reference.zero_grad()
        reference.model.loss(idx, targets, ignore_index=IGNORE).backward()
        for p, q in zip(lit.parameters(), reference.parameters()):
            p.grad = q.grad.clone()
        opt.step()
        plain.step()
    for (name, p), q in zip(lit.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=f"{name} after 3 steps")
    for p, q in zip(lit.parameters(), reference.parameters()):
        s, t = opt.state[p], plain.state[q]
        torch.testing.assert_close(s["exp_avg"], t["exp_avg"], atol=1e-6, rtol=0)
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], atol=1e-6, rtol=0)


# -- the benchmark script ------------------------------------------------------------------------------
# Seconds one step of each contender takes under the fake clock ("probe": the head's three matrix products).
STEP_SECONDS = {"minigpt": 0.5, "tutorial": 2.0, "hf": 1.0, "loss_plain": 0.75, "loss_fused": 0.25, "probe": 0.125}


class FakeClock:
    """A clock that moves only when a contender's step says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def taking(self, seconds: float, fn):
        def run(*args, **kwargs):
            self.now += seconds
            return fn(*args, **kwargs)

        return run


def with_fake_clock(bench, monkeypatch) -> None:
    """Give every step bench_train times a known duration (STEP_SECONDS)."""
    clock = FakeClock()
    monkeypatch.setattr(bench, "Meter", functools.partial(bench.Meter, clock=clock))
    monkeypatch.setattr(LitMiniGPT, "training_step", clock.taking(STEP_SECONDS["minigpt"], LitMiniGPT.training_step))

    def timed_steps(make, name_of):
        def make_timed(*args):
            contender = make(*args)
            return dataclasses.replace(contender, step=clock.taking(STEP_SECONDS[name_of(args)], contender.step))

        return make_timed

    monkeypatch.setattr(bench, "tutorial_contender", timed_steps(bench.tutorial_contender, lambda args: "tutorial"))
    monkeypatch.setattr(bench, "hf_contender", timed_steps(bench.hf_contender, lambda args: "hf"))
    monkeypatch.setattr(bench, "loss_kernel_contender",
                        timed_steps(bench.loss_kernel_contender, lambda args: f"loss_{args[-1]}"))  # fmt: skip
    real_probe = bench.head_matmul_probe

    def head_matmul_probe(rows, device):
        probe, flop = real_probe(rows, device)
        return clock.taking(STEP_SECONDS["probe"], probe), flop

    monkeypatch.setattr(bench, "head_matmul_probe", head_matmul_probe)


def test_bench_train_holds_its_promises_at_a_tiny_size(capsys, monkeypatch):
    # What scripts/bench_train.py promises: every contender trains on the same (batch, block) batches with
    # the same optimizer implementation and settings as minigpt (fused Adam where minigpt uses it), at least
    # 5 timed rounds each, and rates and ratios of the times measured: a fake clock gives each step a known
    # duration, so every number of the summary is known.
    bench = load_script("bench_train")
    with_fake_clock(bench, monkeypatch)
    summary = bench.main(["--quick", "--peers-own-optimizer", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    assert summary["peer_optimizer"] == "same"
    r = summary["block"]["8"]
    opts = r["optimizers"]
    reference = opts["minigpt"]
    assert reference["class"] == "Adam" and reference["fused"] is True  # what LitMiniGPT builds on CPU
    assert reference["lr"] == 1e-2 and reference["weight_decay"] == 0.01 and reference["scheduler"] == "StepLR"
    for name in ("tutorial", "hf", "loss_plain", "loss_fused"):
        assert opts[name] == reference, name
    for name in ("tutorial_own", "hf_own"):  # the labelled second table: torch.optim.Adam's own default
        assert opts[name]["fused"] is None and {**opts[name], "fused": True} == reference
    assert r["batch_shape"] == [2, 8] and r["tokens_per_step"] == 16
    assert all(n >= 5 for n in r["rounds"].values()) and len(r["rounds"]) == 7
    tokens, width, vocab = 16, bench.QUICK["WIDTH"], bench.QUICK["VOCAB"]
    flop = 3 * 2 * tokens * width * vocab  # the head's three products over the step's rows
    expected = {
        "matmul_gflops": flop / STEP_SECONDS["probe"] / 1e9,
        "bound_tok_s": tokens / STEP_SECONDS["probe"],  # 6 x width x vocab FLOP per token at the probe's rate
        **{f"{k}_tok_s": tokens / STEP_SECONDS[k] for k in ("minigpt", "tutorial", "hf", "loss_plain", "loss_fused")},
        "of_bound": STEP_SECONDS["probe"] / STEP_SECONDS["minigpt"],
        "vs_tutorial": STEP_SECONDS["tutorial"] / STEP_SECONDS["minigpt"],
        "vs_hf": STEP_SECONDS["hf"] / STEP_SECONDS["minigpt"],
        "fused_loss_speedup": STEP_SECONDS["loss_plain"] / STEP_SECONDS["loss_fused"],
    }
    assert {k: r[k] for k in expected} == pytest.approx(expected, rel=1e-12)


def test_bench_train_refuses_contenders_that_differ(monkeypatch):
    bench = load_script("bench_train")
    # A peer whose optimizer is not a clone of minigpt's (plain Adam): the benchmark must refuse to report.
    original = bench.tutorial_contender
    monkeypatch.setattr(bench, "tutorial_contender", lambda x, y, device, like: original(x, y, device, None))
    with pytest.raises(RuntimeError, match="contenders differ"):
        bench.main(["--quick", "--no-kernel-rows"])


# -- bf16 autocast and the automatic choice -----------------------------------------------------------------
def loss_and_grads(model: GPT, idx, targets):
    loss = model.loss(idx, targets)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("overrides", [dict(), dict(tie_weights=True, lm_head_bias=False)], ids=["bias", "tied"])
def test_fused_head_under_bf16_autocast_equals_plain_path(overrides):
    # Under autocast the kernel takes its other branch (logits from F.linear in bf16, upcast to float32).
    # Both paths round the head's products to bf16 (8 bits of mantissa), so they agree to bf16 precision:
    # loss within 2e-3 relative, gradients within 2% of each gradient's largest entry; and both stay within
    # 1e-2 of the float32 loss.
    idx, targets = batch(seed=11)
    fused, plain = tiny_model("fused", **overrides), tiny_model("plain", **overrides)
    fp32_loss = plain.loss(idx, targets).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f, grads_f = loss_and_grads(fused, idx, targets)
        loss_p, grads_p = loss_and_grads(plain, idx, targets)
    assert loss_f.dtype == loss_p.dtype == torch.float32
    torch.testing.assert_close(loss_f, loss_p, rtol=2e-3, atol=0)
    torch.testing.assert_close(loss_f, fp32_loss, rtol=1e-2, atol=0)
    for (name, p), g_f, g_p in zip(fused.named_parameters(), grads_f, grads_p):
        assert g_f.dtype == g_p.dtype == p.dtype
        torch.testing.assert_close(g_f, g_p, atol=0.02 * g_p.abs().max().item(), rtol=0, msg=f"gradient of {name}")


def test_auto_takes_the_fused_kernel_only_for_float32_on_cpu_without_autocast(monkeypatch):
    calls = []
    real = minigpt.model.fused_linear_nll_sum
    monkeypatch.setattr(minigpt.model, "fused_linear_nll_sum", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    idx, targets = batch()
    model = tiny_model("auto")
    model.loss(idx, targets)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(idx, targets)
    model.to(torch.bfloat16).loss(idx, targets)
    tiny_model("plain").loss(idx, targets)
    assert len(calls) == 1  # autocast, bf16 weights and "plain" all took the plain path


def test_plain_loss_has_no_data_dependent_shape():
    # On the meta device every value is unknown: an op whose output shape depends on the data (boolean
    # indexing, nonzero) or that reads a value on the host (item, bool) fails. The plain path (the one
    # "auto" takes on a GPU) runs forward and backward there, so it never waits for the device.
    with torch.device("meta"):
        model = GPT(GPTConfig.tiny(vocab_size=48, block_size=12), loss_kernel="plain")
    idx, targets = (t.to("meta") for t in batch())
    loss = model.loss(idx, targets)
    loss.backward()
    assert loss.device.type == "meta" and model.lm_head.weight.grad is not None
    model.loss_kernel = "fused"  # boolean row selection and `.any()`: the proxy catches them
    with pytest.raises((NotImplementedError, RuntimeError)):
        model.loss(idx, targets)


# -- the decode step: one-token trunk and greedy pick (minigpt/kernels/decode_step.py) --------------------

# Every flavour the trunk has a branch for: positions, norms, blocks, MLP activations, QK-norm, embeddings.
DECODE_FLAVOURS = {
    "gpt2": dict(positional="learned", norm_first=True, tie_weights=True, lm_head_bias=False, activation="gelu_tanh"),
    "tutorial": dict(positional="sinusoidal", norm_first=False, scale_embedding=True, activation="relu"),
    "rotary-rms-swiglu-qknorm": dict(positional="rotary", norm="rmsnorm", activation="swiglu", qk_norm=True,
                                     bias=False),
    "rotary-postnorm-relu2": dict(positional="rotary", norm_first=False, activation="relu2"),
    "adaptive-input": dict(head="adaptive", adaptive_cutoffs=(16, 32), tie_weights=True, positional="learned"),
    "rotary-bigram": dict(positional="rotary", norm="rmsnorm", bigram_buckets=40, bigram_dim=8),
}  # fmt: skip


def decode_model(**overrides) -> GPT:
    """A tiny model (vocab 48, block 12) with weights wide enough that the blocks change the states."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=48, block_size=12, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model


def prefilled(model: GPT, padded: bool) -> tuple[KVCache, torch.Tensor | None, torch.Tensor | None]:
    """A cache after a prefill of 5 tokens per row, (B, 5) pad mask and (B, 5) positions (left padding) or
    Nones, as `minigpt.generation` builds them."""
    idx = torch.tensor([[7, 3, 9, 30, 2], [5, 5, 41, 12, 6], [1, 1, 1, 8, 44]])
    pad = torch.tensor([0, 1, 3]) if padded else None
    cache = model.new_cache(3)
    mask = positions = None
    if pad is not None:
        cols = torch.arange(5)[None, :]
        mask, positions = cols < pad[:, None], (cols - pad[:, None]).clamp(min=0)
    model.hidden_states(idx, mask, positions=positions, cache=cache)
    return cache, pad, positions


@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "left-padded"])
@pytest.mark.parametrize("flavour", list(DECODE_FLAVOURS))
def test_lean_one_token_trunk_equals_hidden_states(flavour, padded):
    model = decode_model(**DECODE_FLAVOURS[flavour])
    with torch.inference_mode():
        plain_cache, pad, _ = prefilled(model, padded)
        lean_cache = copy.deepcopy(plain_cache)
        previous = torch.tensor([2, 6, 44])  # the prefill's last tokens (bigram embeddings read them)
        for step, token in enumerate([11, 40, 2, 19, 33, 7]):  # up to the cache's last slot (block 12)
            idx = torch.tensor([[token], [token + 1], [token + 2]])
            positions = None if pad is None else (5 + step - pad)[:, None]  # (B, 1) each row's own position
            plain = model.hidden_states(idx, positions=positions, cache=plain_cache, previous=previous)
            lean = one_token_hidden(model, idx, positions, lean_cache, previous)
            previous = idx[:, 0]
            torch.testing.assert_close(lean, plain)
            assert lean_cache.pos == plain_cache.pos == 6 + step
        for layer in range(model.config.n_layer):
            torch.testing.assert_close(lean_cache.k[layer], plain_cache.k[layer])
            torch.testing.assert_close(lean_cache.v[layer], plain_cache.v[layer])
    assert plain.std(dim=0).min() > 0.01  # rows differ: a row mixed with another would show


def test_lean_one_token_trunk_under_bf16_autocast():
    # Both paths compute in bf16 and keep the cache in float32: the same ops in the same dtypes.
    model = decode_model(**DECODE_FLAVOURS["gpt2"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_cache, _, _ = prefilled(model, padded=False)
        lean_cache = copy.deepcopy(plain_cache)
        idx = torch.tensor([[11], [12], [13]])
        plain = model.hidden_states(idx, cache=plain_cache)
        lean = one_token_hidden(model, idx, None, lean_cache)
    assert lean.dtype == plain.dtype and lean_cache.k[0].dtype == torch.float32
    torch.testing.assert_close(lean.float(), plain.float(), atol=2e-2 * float(plain.abs().max()), rtol=0)


def test_one_thread_restores_the_thread_count_even_after_an_error():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), one_thread():
            raise KeyError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fake_step_timer(monkeypatch):
    """Known durations for the one-time measurements: `durations[name]` lists the seconds of each timed
    call of that contender in turn; `calls` counts the calls that were timed."""
    durations: dict[str, list[float]] = {}
    calls: list[str] = []
    by_function = {}

    def fake_seconds(fn, device):
        fn()
        contender = fn.args[0]  # _fastest times partial(run, contender)
        name = by_function[id(contender)] if id(contender) in by_function else "?"
        calls.append(name)
        times = durations[name]
        return times[(calls.count(name) - 1) % len(times)]

    monkeypatch.setattr(decode_steps, "_seconds", fake_seconds)
    real_trunks = decode_steps._trunks

    def named_trunks(model):
        trunks = real_trunks(model)
        by_function.update({id(fn): name for name, fn in trunks.items()})
        return trunks

    monkeypatch.setattr(decode_steps, "_trunks", named_trunks)
    by_function.update({id(fn): name for name, fn in decode_steps._PICK_FNS.items()})
    decode_steps.reset_decode_steps()
    yield durations, calls
    decode_steps.reset_decode_steps()


def test_auto_trunk_takes_the_lowest_median_once_and_leaves_the_cache_empty(fake_step_timer):
    durations, calls = fake_step_timer
    # "one_thread" has the fastest single call but the slowest usual one (a join waiting on a loaded
    # machine); "lean_one_thread" has the lowest median.
    durations.update(plain=[3.0], one_thread=[0.1, 9.0, 9.0], lean=[2.0], lean_one_thread=[1.0, 1.5])
    model = decode_model()
    cache = model.new_cache(2)
    head_calls = []
    trunk = decode_trunk(model, cache, "auto", head=lambda h: head_calls.append(h.shape))
    assert trunk.func is decode_steps._on_one_thread and trunk.args[0].func is one_token_hidden
    assert resolve_trunk(model, cache) == "lean_one_thread"
    assert len(calls) == 4 * decode_steps._ROUNDS  # measured once per model and batch size
    assert head_calls == [(2, model.config.n_embd)] * (4 * (decode_steps._ROUNDS + 1))  # each step ends in the head
    assert cache.pos == 0 and not cache.key_padding_mask.any()
    assert decode_steps.decode_step_cache_size() == 1
    durations.update(plain=[0.5])  # another batch size is another measurement
    assert resolve_trunk(model, model.new_cache(1)) == "plain"
    assert decode_steps.decode_step_cache_size() == 2


def test_trunk_choices_hooks_and_bad_values(fake_step_timer):
    durations, calls = fake_step_timer
    model = decode_model()
    cache = model.new_cache(1)
    for choice in ("plain", "one_thread", "lean", "lean_one_thread"):
        assert resolve_trunk(model, cache, choice) == choice
    assert calls == []  # a forced choice measures nothing
    with pytest.raises(UserError, match="trunk must be one of 'auto', 'plain', .* got 'fast'"):
        decode_trunk(model, cache, "fast")
    model.transformer.h[0].ln_1.register_forward_hook(lambda *args: None)
    assert resolve_trunk(model, cache, "auto") == "plain" and calls == []  # hooks see no probe step
    with pytest.raises(UserError, match="forward hooks"):
        decode_trunk(model, cache, "lean_one_thread")


@pytest.mark.parametrize("shape", [(1, 100_000), (4, 50_257), (3, 48), (2, 97)], ids=str)
def test_chunked_argmax_equals_argmax(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g)
    torch.testing.assert_close(chunked_argmax(logits), logits.argmax(-1), rtol=0, atol=0)
    B, V = shape
    P = decode_steps._chunk_size(V)
    assert V % P == 0
    if V // P > 2:
        # Ties: the maximum in three chunks (the later ones first in memory order of writing), and twice
        # inside the first of them: argmax's answer is the first index of all.
        first = P + 3
        for i in (V - 1, 2 * P + 1, first + 1, first):
            logits[:, i] = 1e3
        assert chunked_argmax(logits).tolist() == logits.argmax(-1).tolist() == [first] * B
        logits[:, V - 2] = float("nan")  # NaN beats everything, as in argmax
        logits[0, 5] = float("nan")
        assert chunked_argmax(logits).tolist() == logits.argmax(-1).tolist() == [5] + [V - 2] * (B - 1)
    banned = torch.full(shape, -math.inf)  # every score -inf (all banned): index 0, as argmax
    assert chunked_argmax(banned).tolist() == banned.argmax(-1).tolist() == [0] * B


def test_chunked_argmax_reads_rows_of_a_wider_tensor_and_bf16():
    wide = torch.randn(3, 1100)
    logits = wide[:, :1000]  # rows with a stride, like the packed head's output cut to the vocabulary
    assert chunked_argmax(logits).tolist() == logits.argmax(-1).tolist()
    half = torch.randn(2, 4096).to(torch.bfloat16)
    assert chunked_argmax(half).tolist() == half.argmax(-1).tolist()


def test_greedy_pick_auto_keeps_the_faster_one(fake_step_timer):
    durations, calls = fake_step_timer
    durations.update(plain=[2.0], chunked=[1.0])
    logits = torch.randn(2, 3000)
    assert resolve_pick(logits) == "chunked" and len(calls) == 2 * decode_steps._ROUNDS
    assert greedy_pick(logits).tolist() == logits.argmax(-1).tolist()
    assert len(calls) == 2 * decode_steps._ROUNDS  # measured once per device, dtype and shape
    durations.update(chunked=[3.0])
    assert resolve_pick(torch.randn(2, 3001)) == "plain"
    for choice in ("plain", "chunked"):
        assert greedy_pick(logits, choice).tolist() == logits.argmax(-1).tolist()
    with pytest.raises(UserError, match="pick must be one of 'auto', 'plain', 'chunked', got 'fast'"):
        greedy_pick(logits, "fast")
