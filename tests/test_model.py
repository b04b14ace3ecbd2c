import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from script_loader import load_script

from minigpt.config import GPTConfig
from minigpt.hardware import can_compile
from minigpt.model import (
    CPU_SHORT_ATTENTION_MAX_KEYS,
    GPT,
    RMSNorm,
    adaptive_input_embedding,
    bigram_bucket,
    causal_matrix_attention,
    lm_loss,
    plain_chunk_rows,
    row_nll,
    rows_bucket,
)

TransformerModel = load_script("tutorial_model").TransformerModel  # scripts/tutorial_model.py

PAD_ID = 1  # <pad> in minigpt's word vocabularies: an input filler here, never a loss default
IGNORE = -100  # F.cross_entropy's ignore_index, the loss's default


def copy_tutorial_weights(model: GPT, ref: TransformerModel) -> None:
    with torch.no_grad():
        model.transformer.wte.weight.copy_(ref.embedding.weight)
        model.lm_head.weight.copy_(ref.linear.weight)
        model.lm_head.bias.copy_(ref.linear.bias)
        for block, layer in zip(model.transformer.h, ref.transformer_encoder.layers):
            block.attn.c_attn.weight.copy_(layer.self_attn.in_proj_weight)
            block.attn.c_attn.bias.copy_(layer.self_attn.in_proj_bias)
            block.attn.c_proj.weight.copy_(layer.self_attn.out_proj.weight)
            block.attn.c_proj.bias.copy_(layer.self_attn.out_proj.bias)
            block.mlp.c_fc.weight.copy_(layer.linear1.weight)
            block.mlp.c_fc.bias.copy_(layer.linear1.bias)
            block.mlp.c_proj.weight.copy_(layer.linear2.weight)
            block.mlp.c_proj.bias.copy_(layer.linear2.bias)
            for ours, theirs in ((block.ln_1, layer.norm1), (block.ln_2, layer.norm2)):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)


# ---------------------------------------------------------------------------------------------------------
# Helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)


def make_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(**overrides)).eval()
    if model.config.bigram_buckets:  # its projection starts at zero, which would hide the table from every test
        torch.nn.init.normal_(model.transformer.bigram_proj.weight, std=0.5)
    if model.shortlist_weight is not None:  # a copy of the head's rows at init would hide which one is read
        torch.nn.init.normal_(model.shortlist_weight, std=0.5)
    return model


def random_ids(vocab_size: int, *shape: int, seed: int = 1) -> torch.Tensor:
    # Ids from 2 up: 0 and 1 are <unk> and <pad> in minigpt's vocabularies.
    return torch.randint(2, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], total: int, vocab_size: int, seed: int = 2):
    """Ids, key padding mask and position ids for prompts of `lengths` left-padded to `total`."""
    idx = random_ids(vocab_size, len(lengths), total, seed=seed)
    pad = torch.arange(total)[None, :] < (total - torch.tensor(lengths))[:, None]  # (B, T)
    idx[pad] = PAD_ID
    positions = (torch.cumsum(~pad, dim=1) - 1).clamp(min=0)
    return idx, pad, positions


# The modern block: every option that is not the tutorial's (zero-initialised projections are left out here
# so that the blocks are not the identity at init, which would hide a wrong mask or cache).
MODERN = dict(
    positional="rotary", norm="rmsnorm", activation="relu2", qk_norm=True, bias=False, norm_first=True,
    head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True,
)  # fmt: skip

ARCHITECTURES = [
    pytest.param(dict(positional="sinusoidal", norm_first=False), id="sinusoidal-postnorm"),
    pytest.param(dict(positional="learned", norm_first=True, activation="gelu_tanh"), id="learned-prenorm"),
    pytest.param(dict(positional="learned", norm_first=False, tie_weights=True), id="learned-postnorm-tied"),
    pytest.param(
        dict(positional="sinusoidal", norm_first=True, head="adaptive", adaptive_cutoffs=(8, 20)),
        id="sinusoidal-prenorm-adaptive",
    ),
    pytest.param(
        dict(positional="learned", norm_first=True, head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True),
        id="learned-prenorm-adaptive-input",
    ),
    pytest.param(MODERN, id="rotary-rmsnorm-relu2-qknorm"),
    pytest.param(dict(MODERN, activation="swiglu", norm_first=False, bias=True, head="linear"), id="rotary-swiglu"),
    pytest.param(dict(MODERN, bigram_buckets=40, bigram_dim=8), id="modern-bigram"),
    pytest.param(dict(MODERN, tie_shortlist=False), id="modern-own-shortlist"),
    pytest.param(dict(positional="learned", norm_first=True, bigram_buckets=40, bigram_dim=8), id="learned-bigram"),
]


# ---------------------------------------------------------------------------------------------------------
# Fidelity to the tutorial


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
def test_seed_model_equals_tutorial_transformer_encoder(padded):
    vocab_size, block_size = 500, 30
    torch.manual_seed(0)
    ref = TransformerModel(vocab_size, 200, 2, 2048, 2, dropout=0.2).eval()
    model = GPT(GPTConfig.seed(vocab_size=vocab_size, block_size=block_size)).eval()
    copy_tutorial_weights(model, ref)

    idx = random_ids(vocab_size, 4, block_size)
    pad = None
    if padded:
        lengths = torch.tensor([30, 17, 5, 1])
        pad = torch.arange(block_size)[None, :] >= lengths[:, None]
        idx[pad] = PAD_ID
    causal = nn.Transformer.generate_square_subsequent_mask(block_size)
    # The same float form as the causal mask (mixing bool and float masks is deprecated).
    float_pad = None if pad is None else torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
    with torch.no_grad():
        expected = ref(idx.t(), causal, src_key_padding_mask=float_pad).transpose(0, 1)  # sequence-first
        logits = model(idx, pad)
    assert logits.shape == (4, block_size, vocab_size)
    keep = torch.ones_like(idx, dtype=torch.bool) if pad is None else ~pad
    torch.testing.assert_close(logits[keep], expected[keep], atol=1e-5, rtol=0)
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_causality(arch):
    model = make_model(**arch)
    idx = random_ids(32, 2, 16)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1 - 2) % 30 + 2
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 9:], before[:, 9:], atol=1e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_does_not_change_non_pad_logits(arch):
    model = make_model(**arch)
    lengths = [16, 11, 4]
    idx = random_ids(32, 3, 16)
    right_pad = torch.arange(16)[None, :] >= torch.tensor(lengths)[:, None]
    idx[right_pad] = PAD_ID
    left_idx, left_pad, positions = left_padded(lengths, 16, 32)
    with torch.no_grad():
        right = model(idx, right_pad)
        left = model(left_idx, left_pad, positions=positions)
        for b, n in enumerate(lengths):
            alone = model(idx[b : b + 1, :n])[0]
            torch.testing.assert_close(right[b, :n], alone, atol=1e-5, rtol=0)
            alone = model(left_idx[b : b + 1, 16 - n :])[0]
            torch.testing.assert_close(left[b, 16 - n :], alone, atol=1e-5, rtol=0)
    # A left-padded pad query sees no real key; it must still not produce NaN.
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


# ---------------------------------------------------------------------------------------------------------
# Loss and training


def test_initial_loss_is_close_to_log_vocab():
    vocab_size = 500
    torch.manual_seed(0)
    model = GPT(GPTConfig.seed(vocab_size=vocab_size, block_size=30)).eval()
    idx, targets = random_ids(vocab_size, 8, 30, seed=3), random_ids(vocab_size, 8, 30, seed=4)
    with torch.no_grad():
        loss = model.loss(idx, targets).item()
    # The LayerNorm output has unit variance and Xavier gives the head weights a variance of
    # 2 / (V + C), so the logits have variance 2C / (V + C) = 0.57 here and the expected loss exceeds
    # ln(V) by about half of that (0.29): near-uniform, but not exactly.
    assert math.log(vocab_size) < loss < math.log(vocab_size) + 0.5


def test_overfits_one_batch():
    model = make_model().train()
    idx = random_ids(32, 4, 16, seed=5)
    targets = random_ids(32, 4, 16, seed=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        loss = model.loss(idx, targets)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01


def test_the_plain_loss_takes_larger_chunks_on_an_accelerator():
    # 64 MiB of float32 logits per chunk on a CPU, 1 GiB on a GPU (no GPU needed: only the rule).
    assert plain_chunk_rows("cpu", 100_000) == 2**24 // 100_000 == 167
    assert plain_chunk_rows(torch.device("cuda"), 100_000) == 2**28 // 100_000 == 2684
    assert plain_chunk_rows("cpu", 2**30) == 1  # never zero rows


@pytest.mark.parametrize("loss_kernel", ["plain", "fused"])
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(), id="untied"),
        pytest.param(dict(tie_weights=True, lm_head_bias=False, norm_first=True), id="tied-nobias"),
        pytest.param(dict(bias=False, positional="learned"), id="learned-nobias"),
    ],
)
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(overrides, loss_kernel):
    model = make_model(vocab_size=32, **overrides)
    model.loss_kernel = loss_kernel
    idx = random_ids(32, 3, 16, seed=7)
    targets = random_ids(32, 3, 16, seed=8)
    lengths = torch.tensor([16, 12, 16])
    pad = torch.arange(16)[None, :] >= lengths[:, None]
    idx[pad], targets[pad] = PAD_ID, IGNORE
    targets[2, 3] = IGNORE  # an ignored target inside a sequence
    params = dict(model.named_parameters())

    plain = lm_loss(model(idx, pad), targets)
    plain_grads = torch.autograd.grad(plain, list(params.values()))
    # 48 rows, 43 of them counted: one chunk, chunks of 5 (the last one partial), 7, and row by row.
    for chunk_size in (None, 5, 7, 1):
        chunked = model.loss(idx, targets, pad, chunk_size=chunk_size)
        chunked_grads = torch.autograd.grad(chunked, list(params.values()))
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
        for name, g_plain, g_chunked in zip(params, plain_grads, chunked_grads):
            torch.testing.assert_close(g_chunked, g_plain, atol=1e-5, rtol=0, msg=f"gradient of {name}, {chunk_size}")

    nll_sum, count = model.loss_sum_and_count(idx, targets, pad)
    assert count.item() == (targets != IGNORE).sum().item() == 43
    torch.testing.assert_close(nll_sum / count, plain, atol=1e-5, rtol=0)
    with torch.no_grad():  # the no-grad path skips the gradient products but gives the same loss
        torch.testing.assert_close(model.loss(idx, targets, pad), plain.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_kernel", ["plain", "fused"])
def test_loss_with_no_counted_target_is_zero(loss_kernel):
    model = make_model()
    model.loss_kernel = loss_kernel
    idx = random_ids(32, 2, 8)
    targets = torch.full_like(idx, IGNORE)
    loss = model.loss(idx, targets)
    loss.backward()
    assert loss.item() == 0.0
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("loss_kernel", ["plain", "fused"])
def test_default_ignore_index_counts_every_real_token_id(loss_kernel):
    # With GPT-2's byte-level BPE, id 1 is '"' and id 2 is '#': real tokens that the loss must count. Only
    # F.cross_entropy's -100 is ignored by default (minigpt's old default ignored id 1, every quote).
    from tokenizers import Tokenizer, models, pre_tokenizers

    # GPT-2's byte-level alphabet in GPT-2's order ('!' = 0, '"' = 1, '#' = 2, ...), no merges.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    bpe = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ids = bpe.encode('A "great" #1').ids
    assert bpe.token_to_id('"') == 1 and ids.count(1) == 2
    model = make_model(vocab_size=256, block_size=16)
    model.loss_kernel = loss_kernel
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    nll_sum, count = model.loss_sum_and_count(x, y)
    assert count.item() == y.numel()
    torch.testing.assert_close(model.loss(x, y), lm_loss(model(x), y), atol=1e-5, rtol=0)
    # The quote's own loss is in the mean: leaving it out changes the loss.
    without_quotes = lm_loss(model(x), torch.where(y == 1, IGNORE, y))
    assert abs(model.loss(x, y).item() - without_quotes.item()) > 1e-4


def test_loss_kernel_is_validated():
    with pytest.raises(ValueError, match="loss_kernel must be one of"):
        GPT(GPTConfig.tiny(), loss_kernel="fast")


# ---------------------------------------------------------------------------------------------------------
# Adaptive softmax head


def test_adaptive_head_log_probabilities_and_loss():
    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20))
    idx = random_ids(32, 3, 16, seed=9)
    targets = random_ids(32, 3, 16, seed=10)
    targets[1, 10:] = IGNORE
    log_probs = model(idx)
    assert log_probs.shape == (3, 16, 32)
    # Normalised over the whole vocabulary, so its softmax is itself.
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)

    params = list(model.parameters())
    plain = lm_loss(log_probs, targets)
    plain_grads = torch.autograd.grad(plain, params)
    fast = model.loss(idx, targets)
    fast_grads = torch.autograd.grad(fast, params)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    for g_fast, g_plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=0)
    assert not hasattr(model, "lm_head")


def test_adaptive_loss_under_bf16_autocast_multiplies_in_bf16_and_normalises_in_float32():
    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20))
    idx, targets = random_ids(32, 3, 16, seed=9), random_ids(32, 3, 16, seed=10)
    dtypes = []
    model.adaptive.head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.loss(idx, targets)
    assert dtypes == [torch.bfloat16] and mixed.dtype == torch.float32
    mixed.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    torch.testing.assert_close(mixed, model.loss(idx, targets), atol=0.05, rtol=0)


needs_compiler = pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler")


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_nll_is_cross_entropy_with_its_gradient_in_the_logits_dtype(compiled, dtype):  # RowNLL when compiled
    for rows, classes in ((37, 1003), (3, 5000), (1, 7)):  # the clusters' shapes vary: one graph for all
        logits = (3 * torch.randn(rows, classes, generator=torch.Generator().manual_seed(rows))).to(dtype)
        logits.requires_grad_()
        target = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(1))
        weight = torch.randn(rows, generator=torch.Generator().manual_seed(2))  # each row's gradient scales
        nll = row_nll(logits, target, compiled)
        (grad,) = torch.autograd.grad((nll * weight).sum(), logits)
        ref = F.cross_entropy(logits.float(), target, reduction="none")
        (ref_grad,) = torch.autograd.grad((ref * weight).sum(), logits)
        assert nll.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


@needs_compiler
def test_compiled_parts_compute_the_plain_models_loss_and_gradients():
    plain = make_model(head="adaptive", adaptive_cutoffs=(8, 20), bigram_buckets=64, dropout=0.0)
    compiled = make_model(head="adaptive", adaptive_cutoffs=(8, 20), bigram_buckets=64, dropout=0.0)
    compiled.compile_parts()
    assert compiled.compiled_loss and not plain.compiled_loss
    idx, targets = random_ids(32, 3, 16, seed=9), random_ids(32, 3, 16, seed=10)
    losses = [model.loss(idx, targets) for model in (plain, compiled)]
    grads = [torch.autograd.grad(loss, list(model.parameters())) for loss, model in zip(losses, (plain, compiled))]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for g_compiled, g_plain in zip(*reversed(grads)):
        torch.testing.assert_close(g_compiled, g_plain, atol=1e-5, rtol=1e-4)
    assert not any("_orig_mod" in k for k in compiled.state_dict())  # compiled in place: the usual keys


def test_rows_bucket_rounds_up_to_few_sizes_by_at_most_an_eighth():
    assert [rows_bucket(n) for n in (1, 8, 9, 100, 500, 512, 600, 4096)] == [8, 8, 16, 104, 512, 512, 640, 4096]
    assert all(n <= rows_bucket(n) <= n + max(7, n // 8) for n in range(1, 5000))
    # The row counts of a cluster across batches (a few hundred apart) map to a handful of sizes.
    assert len({rows_bucket(n) for n in range(400, 700)}) == 7


def test_adaptive_loss_gives_each_cluster_a_bucketed_number_of_rows():
    # oneDNN builds a kernel per matrix-product shape: a cluster's row count that changes with every batch
    # would build new ones at every step. The loss pads each cluster's rows to `rows_bucket` of their count
    # (the loss and gradients stay exact: test_adaptive_head_log_probabilities_and_loss).
    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20))
    seen = []
    for cluster in model.adaptive.tail:
        cluster.register_forward_hook(lambda module, args, out: seen.append(args[0].size(0)))
    idx = random_ids(32, 3, 16, seed=9)
    targets = torch.zeros(3, 16, dtype=torch.long)
    targets.view(-1)[:13] = 10  # 13 targets in the first tail cluster [8, 20)
    targets.view(-1)[13:30] = 25  # 17 in the second [20, 32)
    model.loss(idx, targets).backward()
    assert seen == [rows_bucket(13), rows_bucket(17)] == [16, 24]


def test_adaptive_loss_refuses_targets_outside_the_vocabulary():
    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20))
    idx, targets = random_ids(32, 2, 8, seed=9), random_ids(32, 2, 8, seed=10)
    targets[1, 3] = 32
    with pytest.raises(ValueError, match=r"targets must be in \[0, 31\], got \[\d+, 32\]"):
        model.loss(idx, targets)


def test_adaptive_input_embedding_is_tied_to_the_adaptive_head():
    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True, n_embd=32)
    untied = make_model(head="adaptive", adaptive_cutoffs=(8, 20), n_embd=32)
    assert "wte" not in model.transformer and not any("wte" in k for k in model.state_dict())
    # The input embedding owns no weights: the tied model is the untied one without its 32 x 32 table.
    assert model.num_parameters() == untied.num_parameters() - 32 * 32
    head, (tail1, tail2) = model.adaptive.head, model.adaptive.tail
    idx = torch.tensor([[0, 7, 8, 19, 20, 31]])
    x = adaptive_input_embedding(idx, model.adaptive)
    assert x.shape == (1, 6, 32)
    torch.testing.assert_close(x[0, 0], head.weight[0])
    torch.testing.assert_close(x[0, 1], head.weight[7])
    # Tail cluster 1 holds ids 8..19 at width 32 // 4 = 8, cluster 2 ids 20..31 at width 2.
    torch.testing.assert_close(x[0, 2], tail1[1].weight[0] @ tail1[0].weight)
    torch.testing.assert_close(x[0, 3], tail1[1].weight[11] @ tail1[0].weight)
    torch.testing.assert_close(x[0, 4], tail2[1].weight[0] @ tail2[0].weight)
    torch.testing.assert_close(x[0, 5], tail2[1].weight[11] @ tail2[0].weight)
    # A tail token's gradient reaches its own row of the tail and nothing of the shortlist.
    grad_tail, grad_head = torch.autograd.grad(x[0, 3].sum(), [tail1[1].weight, head.weight])
    assert grad_tail[11].abs().sum() > 0 and grad_tail[:11].abs().sum() == 0 and grad_tail[12:].abs().sum() == 0
    assert grad_head.abs().sum() == 0


def test_own_shortlist_table_starts_as_the_heads_rows_and_learns_apart_from_them():
    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True, tie_shortlist=False, n_embd=32)
    tied = make_model(head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True, n_embd=32)
    torch.manual_seed(0)
    model = GPT(model.config)  # as built, without make_model's perturbation
    head, table = model.adaptive.head.weight, model.transformer.shortlist.weight
    assert table.shape == (8, 32) and table.data_ptr() != head.data_ptr()
    assert model.num_parameters() == tied.num_parameters() + 8 * 32
    assert model.num_parameters(exclude_embeddings=True) == tied.num_parameters(exclude_embeddings=True)
    idx = torch.tensor([[0, 7, 8, 19, 20, 31]])
    # At init the table is a copy of the head's rows: the model computes what the tied one computes.
    torch.testing.assert_close(table, head[:8], atol=0, rtol=0)
    x = adaptive_input_embedding(idx, model.adaptive, table)
    torch.testing.assert_close(x, adaptive_input_embedding(idx, model.adaptive), atol=0, rtol=0)
    # A shortlist token's input gradient reaches its row of the table, not the head; tail tokens stay tied.
    grad_table, grad_head = torch.autograd.grad(x[0, 1].sum(), [table, head], allow_unused=True)
    assert grad_table[7].abs().sum() > 0 and grad_table[:7].abs().sum() == 0 and grad_head is None
    tail_output = model.adaptive.tail[0][1].weight
    (grad_tail,) = torch.autograd.grad(x[0, 3].sum(), [tail_output])
    assert grad_tail[11].abs().sum() > 0
    # After training the two copies differ, and the model reads its inputs from the table.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch, targets = random_ids(32, 4, 16, seed=3), random_ids(32, 4, 16, seed=4)
    for _ in range(5):
        opt.zero_grad()
        model.loss(batch, targets).backward()
        opt.step()
    assert not torch.equal(table, head[:8])
    with torch.no_grad():
        before = model.eval()(idx)
        table.add_(1.0)
        assert not torch.equal(model(idx), before)


def test_adaptive_input_model_trains_and_reloads(tmp_path):
    from minigpt.checkpoint import load_model, new_checkpoint, save_checkpoint
    from minigpt.tokenizer import Vocab

    model = make_model(head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True, positional="learned")
    idx, targets = random_ids(32, 4, 16, seed=3), random_ids(32, 4, 16, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(idx, targets).item()
    for _ in range(20):
        opt.zero_grad()
        model.loss(idx, targets).backward()
        opt.step()
    assert model.loss(idx, targets).item() < first - 1.0
    path = tmp_path / "model.ckpt"
    save_checkpoint(new_checkpoint(model, tokenizer=Vocab.build(["a b c"])), path)
    reloaded = load_model(path)[0].eval()
    torch.testing.assert_close(reloaded(idx), model.eval()(idx), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kv_cache_equals_full_forward(arch, padded):
    model = make_model(**arch)
    total, prompt = 14, 6
    if padded:
        idx, pad, positions = left_padded([6, 3, 1], total, 32)
        # Only the prompt is padded; generated tokens follow the real ones.
        idx[:, prompt:] = random_ids(32, 3, total - prompt, seed=11)
        pad[:, prompt:] = False
        positions = (torch.cumsum(~pad, dim=1) - 1).clamp(min=0)
    else:
        idx, pad, positions = random_ids(32, 3, total, seed=12), None, None

    with torch.no_grad():
        full = model(idx, pad, positions=positions)
        cache = model.new_cache(3)
        steps = [(0, prompt), (prompt, prompt + 3)] + [(t, t + 1) for t in range(prompt + 3, total)]
        pieces = []
        for a, b in steps:  # prefill, a chunk of 3 at an offset, then one token at a time
            piece_pad = None if pad is None or not pad[:, a:b].any() else pad[:, a:b]
            piece_pos = None if positions is None else positions[:, a:b]
            # What a model with bigram embeddings needs to continue: the token before, -1 for none (a pad).
            previous = None if not a else idx[:, a - 1] if pad is None else idx[:, a - 1].masked_fill(pad[:, a - 1], -1)
            pieces.append(model(idx[:, a:b], piece_pad, positions=piece_pos, cache=cache, previous=previous))
            assert cache.pos == b
    cached = torch.cat(pieces, dim=1)
    keep = torch.ones_like(idx, dtype=torch.bool) if pad is None else ~pad
    torch.testing.assert_close(cached[keep], full[keep], atol=1e-5, rtol=0)
    assert torch.isfinite(cached).all()


def test_bigram_embedding_reads_the_token_before():
    fresh = GPT(GPTConfig.tiny(bigram_buckets=40, bigram_dim=8))
    assert torch.all(fresh.transformer.bigram_proj.weight == 0)  # a new model starts as if it had no table
    model = make_model(bigram_buckets=40, bigram_dim=8)
    idx, pos = random_ids(32, 2, 8), torch.arange(8)
    changed = idx.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 2) % 30 + 2
    with torch.no_grad():
        x = model.embed(idx, pos)
        # A token's vector moves with its own id and with the id before it, nothing else.
        moved = (model.embed(changed, pos) - x).abs().amax(-1) > 1e-6  # (2, 8)
        assert moved[:, 3:5].all() and not moved[:, :3].any() and not moved[:, 5:].any()
        # A continuation's first token reads the token before it from `previous`...
        torch.testing.assert_close(model.embed(idx[:, 4:], pos[4:], previous=idx[:, 3]), x[:, 4:])
        # ...and without it (a window's first token) reads "none", as does a token after a pad.
        alone = model.embed(idx[:, 4:], pos[4:])
        assert (alone[:, 0] - x[:, 4]).abs().amax() > 1e-3
        torch.testing.assert_close(alone[:, 1:], x[:, 5:])
        padded = torch.cat([torch.full((2, 1), PAD_ID), idx[:, 4:]], dim=1)
        torch.testing.assert_close(model.embed(padded, pos[3:], key_padding_mask=padded == PAD_ID)[:, 1:], alone)
        # A cache that holds tokens cannot be continued without it.
        cache = model.new_cache(2)
        model(idx[:, :4], cache=cache)
        with pytest.raises(ValueError, match=r"bigram embeddings \(bigram_buckets > 0\): continuing a cache"):
            model(idx[:, 4:5], cache=cache)
        with pytest.raises(ValueError, match=r"previous must have shape \(2,\), one token per row, got \(2, 1\)"):
            model(idx[:, 4:5], cache=cache, previous=idx[:, 3:4])


def test_bigram_dropout_drops_table_features_in_training_only():
    model = make_model(bigram_buckets=40, bigram_dim=8, bigram_dropout=0.5)
    idx = random_ids(32, 4, 16)
    before = torch.full_like(idx, -1)
    with torch.no_grad():
        rows = model.transformer.bigram(bigram_bucket(before, idx, 40))
        kept = rows.clone()
        model.eval()
        torch.testing.assert_close(model.bigram_embedding(before, idx), model.transformer.bigram_proj(rows))
        model.train()
        # Seen through the projection, a dropped feature is zero and a kept one is scaled by 1 / (1 - p).
        captured = {}
        handle = model.transformer.bigram_proj.register_forward_hook(lambda m, a, out: captured.update(x=a[0]))
        model.bigram_embedding(before, idx)
        handle.remove()
    dropped = captured["x"] == 0
    assert 0.4 < dropped.float().mean() < 0.6
    torch.testing.assert_close(captured["x"][~dropped], 2 * kept[~dropped])


def test_kv_cache_rejects_overflow_and_wrong_batch():
    model = make_model()
    cache = model.new_cache(2)
    with torch.no_grad():
        model(random_ids(32, 2, 12), cache=cache)
        with pytest.raises(ValueError, match="Cannot forward sequence of length 5 at cache position 12"):
            model(random_ids(32, 2, 5), cache=cache)
        with pytest.raises(ValueError, match="The cache holds 2 sequences but idx has 3"):
            model(random_ids(32, 3, 1), cache=cache)
    cache.reset()
    assert cache.pos == 0


# ---------------------------------------------------------------------------------------------------------
# Structure


def test_tied_weights_share_one_tensor():
    model = make_model(tie_weights=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = make_model()
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    # The shared matrix counts once.
    assert untied.num_parameters() - model.num_parameters() == 32 * 32
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters()
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - 32 * 32


def test_gpt2_flavour_parameter_names():
    model = GPT(GPTConfig.gpt2(vocab_size=50, block_size=8, n_embd=16, n_layer=2, n_head=2))
    names = set(model.state_dict())
    for name in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.ln_1.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_proj.bias",
        "transformer.h.1.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ):
        assert name in names
    assert "lm_head.bias" not in names
    assert model.transformer.h[0].attn.c_attn.weight.shape == (48, 16)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (64, 16)
    # The sinusoidal table is rebuilt at init, not stored.
    assert not any("sinusoidal" in name for name in GPT(GPTConfig.tiny()).state_dict())


def test_init_is_xavier_uniform():
    model = make_model()
    weight = model.lm_head.weight  # (32, 32): bound sqrt(6 / 64)
    assert weight.abs().max() <= math.sqrt(6 / 64)
    assert weight.std() > 0.5 * math.sqrt(2 / 64)
    assert torch.all(model.lm_head.bias == 0) and torch.all(model.transformer.h[0].ln_1.weight == 1)


def test_sequence_longer_than_block_size_raises():
    model = make_model()
    with pytest.raises(ValueError, match="Cannot forward sequence of length 17, block_size is only 16"):
        model(random_ids(32, 1, 17))
    with pytest.raises(ValueError, match="Cannot forward position 16, block_size is only 16"):
        model(random_ids(32, 1, 4), positions=torch.arange(13, 17))
    with pytest.raises(ValueError, match="key_padding_mask must have the shape of idx"):
        model(random_ids(32, 2, 4), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        model(random_ids(32, 2, 4), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------------
# The modern block's options


def test_rotary_logits_depend_only_on_relative_positions():
    # Rotary positions enter only through q.k, which depends on the distance between two positions: shifting
    # every position by the same amount leaves the logits unchanged. Additive positions do not have this.
    model = make_model(positional="rotary", norm_first=True)
    idx = random_ids(32, 2, 6)
    with torch.no_grad():
        at_0, at_5 = model(idx), model(idx, positions=torch.arange(5, 11))
    torch.testing.assert_close(at_5, at_0, atol=1e-5, rtol=0)
    learned = make_model(positional="learned", norm_first=True)
    with torch.no_grad():
        assert not torch.allclose(learned(idx), learned(idx, positions=torch.arange(5, 11)), atol=1e-3)
    # ...but the model does see the order of the tokens.
    with torch.no_grad():
        assert not torch.allclose(model(idx)[:, -1], model(idx.flip(1))[:, -1], atol=1e-3)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    idx = random_ids(32, 2, 8)
    for qk_norm in (True, False):
        model = make_model(qk_norm=qk_norm, norm_first=True, bias=False)  # no bias: the rows scale q and k
        with torch.no_grad():
            before = model(idx)
            for block in model.transformer.h:  # scale the query and key rows of the fused projection
                block.attn.c_attn.weight[: 2 * 32].mul_(10.0)
            after = model(idx)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
        else:
            assert not torch.allclose(after, before, atol=1e-3)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_bf16_attention_on_cpu_takes_the_path_its_key_limit_gives(monkeypatch, positional):
    limit = CPU_SHORT_ATTENTION_MAX_KEYS
    model = make_model(positional=positional, qk_norm=True, norm_first=True, block_size=limit + 8)
    seen = []
    sdpa, matrix = torch.nn.functional.scaled_dot_product_attention, causal_matrix_attention

    def recording_sdpa(q, k, v, **kwargs):
        out = sdpa(q, k, v, **kwargs)
        seen.append(("kernel", out.dtype))  # the dtype it computed in: autocast casts this op's inputs after the call
        return out

    def recording_matrix(q, k, v, *args):
        seen.append(("matrix", q.dtype))
        return matrix(q, k, v, *args)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr("minigpt.model.causal_matrix_attention", recording_matrix)
    # A whole block's causal attention (training, validation): matrix products up to the limit, the kernel beyond.
    for length, path in ((limit, ("matrix", torch.bfloat16)), (limit + 1, ("kernel", torch.bfloat16))):
        seen.clear()
        idx = random_ids(32, 2, length)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(idx, idx.roll(-1, 1))
        loss.backward()
        assert seen == [path] * 2  # both layers
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
    # Attention with a mask of its own (padded prompts) takes the kernel: in float32 up to its limit.
    for keys, dtype in ((limit, torch.float32), (limit + 1, torch.bfloat16)):
        seen.clear()
        idx, pad, _ = left_padded([3, keys], keys, 32)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, key_padding_mask=pad)
        assert seen == [("kernel", dtype)] * 2
    # Outside autocast a float32 model's attention is the float32 kernel as before.
    seen.clear()
    with torch.no_grad():
        model(random_ids(32, 2, 8))
    assert seen == [("kernel", torch.float32)] * 2


@pytest.mark.parametrize("length", [1, 7, 64])
def test_causal_matrix_attention_is_sdpa_in_bf16_precision(length):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, length, 16) for _ in range(3))
    grad = torch.randn(3, 2, length, 16)
    # The reference: the float32 kernel on the same bfloat16-rounded inputs.
    ref_inputs = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_inputs, is_causal=True)
    ref.backward(grad)
    inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = causal_matrix_attention(*inputs)
    out.backward(grad.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=6e-2, rtol=4e-2)
    # A later token never reaches an earlier output.
    late = [t.clone() for t in inputs]
    late[1][..., -1, :] += 5.0
    late[2][..., -1, :] += 5.0
    changed = causal_matrix_attention(*late).detach()
    torch.testing.assert_close(changed[..., :-1, :], out.detach()[..., :-1, :], atol=0, rtol=0)


def test_causal_matrix_attention_drops_attention_weights_in_training():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8).bfloat16() for _ in range(3))
    plain = causal_matrix_attention(q, k, v)
    torch.manual_seed(1)
    dropped = causal_matrix_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped.float(), plain.float(), atol=1e-2)
    torch.manual_seed(1)
    torch.testing.assert_close(causal_matrix_attention(q, k, v, dropout_p=0.5), dropped, atol=0, rtol=0)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_kind(norm):
    model = make_model(norm=norm)  # post-norm: every block ends in its norm (unit gain at init)
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
    assert kinds == {nn.LayerNorm if norm == "layernorm" else RMSNorm}
    with torch.no_grad():
        h = model.hidden_states(random_ids(32, 2, 8))
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(2, 8), atol=1e-3, rtol=0)  # unit RMS either way
    mean = h.mean(-1).abs().max()
    assert mean < 1e-5 if norm == "layernorm" else mean > 1e-2  # only LayerNorm centres


@pytest.mark.parametrize("activation", ["relu", "relu2", "swiglu", "gelu", "gelu_tanh"])
def test_mlp_activation(activation):
    mlp = make_model(activation=activation).transformer.h[0].mlp
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    h = mlp.c_fc(x)
    expected = {
        "relu": lambda: torch.relu(h),
        "relu2": lambda: torch.relu(h) ** 2,
        "swiglu": lambda: torch.nn.functional.silu(h[:, :64]) * h[:, 64:],
        "gelu": lambda: torch.nn.functional.gelu(h),
        "gelu_tanh": lambda: torch.nn.functional.gelu(h, approximate="tanh"),
    }[activation]()
    assert mlp.c_fc.out_features == (128 if activation == "swiglu" else 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.c_proj(expected), atol=1e-6, rtol=0)


def test_zero_init_projections_make_every_block_the_identity():
    model = make_model(zero_init_proj=True, norm_first=True)
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    idx = random_ids(32, 2, 8)
    with torch.no_grad():
        h = model.hidden_states(idx)
        x = model.embed(idx, torch.arange(8))
    torch.testing.assert_close(h, model.transformer.ln_f(x), atol=1e-6, rtol=0)
    assert make_model(norm_first=True).transformer.h[0].attn.c_proj.weight.any()
