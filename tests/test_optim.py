import copy

import pytest
import torch

from minigpt import optim
from minigpt.config import GPTConfig
from minigpt.lit_module import LitMiniGPT
from minigpt.model import GPT
from minigpt.optim import MuonWithAdamW, fused_qkv, hidden_matrices


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.tiny(vocab_size=50, block_size=8, dropout=0.0))
    x = torch.randint(0, 50, (4, 8))
    return model, x, torch.roll(x, -1, dims=1)


def split(model):
    muon = hidden_matrices(model)
    taken = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return muon, [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip


def combined(model, fused=None, ns_dtype=torch.bfloat16):
    # bfloat16 (torch.optim.Muon's own) whatever the machine, so a step can be held to torch's bit for bit.
    muon, groups = split(model)
    return MuonWithAdamW(muon, groups, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), fused=fused, ns_dtype=ns_dtype)


def train(model, opt, x, y, steps, scheduler=None):
    for _ in range(steps):
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


def test_muon_takes_exactly_the_blocks_weight_matrices():
    model, _, _ = model_and_batch()
    muon = hidden_matrices(model)
    names = {n for n, p in model.named_parameters() if any(p is q for q in muon)}
    expected = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert names == expected and all(".attn." in n or ".mlp." in n for n in names)
    assert not any("wte" in n or "wpe" in n or "head" in n for n in names)


@pytest.mark.parametrize("found_inf", [None, 0.0], ids=["muon-step", "skippable-step"])
def test_steps_like_muon_and_adamw_side_by_side(found_inf):
    # With found_inf set (what training does with the fused AdamW), Muon's half is minigpt's own
    # out-of-place step: it must be torch.optim.Muon's, bit for bit.
    model, x, y = model_and_batch()
    twin, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    opt = combined(model, fused=True)
    if found_inf is not None:
        opt.found_inf = torch.tensor(found_inf)
    train(model, opt, x, y, 3)

    muon, groups = split(twin)
    parts = [torch.optim.Muon(muon, lr=1e-2, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw"),
             torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=True)]  # fmt: skip
    for _ in range(3):
        twin.loss(x, y).backward()
        for part in parts:
            part.step()
            part.zero_grad(set_to_none=True)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    for p, q in zip(opt.muon.param_groups[0]["params"], parts[0].param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["momentum_buffer"], parts[0].state[q]["momentum_buffer"])
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # every weight learned


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_a_fused_qkv_matrix_steps_as_its_three_maps_would_on_their_own(ns_dtype):
    # In bfloat16 the three separate maps step through torch.optim.Muon itself: the fused matrix's
    # step is Muon's on q, k and v, bit for bit, and not Muon's on the stack of the three.
    # In float32 they step through MuonWithAdamW, as three matrices of their own.
    torch.manual_seed(0)
    start, grads = torch.randn(3 * 8, 8), [torch.randn(3 * 8, 8) for _ in range(3)]
    fused, whole = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    maps = [torch.nn.Parameter(m.clone()) for m in start.chunk(3)]

    def opt(params, **kwargs):
        spare = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]  # AdamW's half, left without gradients
        return MuonWithAdamW(params, spare, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), ns_dtype=ns_dtype, **kwargs)

    if ns_dtype == torch.bfloat16:
        apart = torch.optim.Muon(maps, lr=1e-2, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    else:
        apart = opt(maps)
    opts = [opt([fused], qkv=[fused]), apart, opt([whole])]
    for grad in grads:
        fused.grad, whole.grad = grad.clone(), grad.clone()
        for m, g in zip(maps, grad.chunk(3)):
            m.grad = g.clone()
        for o in opts:
            o.step()
    assert torch.equal(fused, torch.cat(maps))
    assert not torch.allclose(fused, whole, atol=1e-3) and not torch.equal(fused, start)


def test_matrices_of_one_shape_are_orthogonalised_together_as_each_would_be_alone():
    # Square, wide and tall (a tall matrix is iterated transposed, so it shares a batch with its wide
    # transpose's shape), a shape seen once, in mixed order: each result is the single matrix's, bit for bit
    # in bfloat16 (Muon's own). In float32 a single matrix's products alone do not repeat bit for bit (MKL's
    # float32 kernels round by the buffers' memory alignment), so there they agree to float32's rounding.
    torch.manual_seed(0)
    shapes = [(8, 8), (8, 24), (24, 8), (8, 8), (6, 8), (8, 24), (8, 8)]
    matrices = [torch.randn(*shape) for shape in shapes]
    ns = (3.4445, -4.775, 2.0315), 5, 1e-7
    for dtype in (torch.bfloat16, torch.float32):
        together = optim._orthogonalize_all(matrices, *ns, dtype)
        for m, t in zip(matrices, together):
            alone = optim._orthogonalize(m, *ns, dtype)
            assert t.shape == m.shape and t.dtype == dtype
            if dtype == torch.bfloat16:
                assert torch.equal(t, alone)
            else:
                torch.testing.assert_close(t, alone, atol=1e-5, rtol=0)
        assert not torch.allclose(together[0], together[3], atol=1e-2)  # its own result, not a neighbour's


def test_qkv_must_be_among_muons_matrices():
    model, _, _ = model_and_batch()
    muon, groups = split(model)
    with pytest.raises(ValueError, match="every qkv matrix must be one of muon_params"):
        MuonWithAdamW(muon[1:], groups, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), qkv=[muon[0]])


@pytest.mark.parametrize("native", [True, False])
def test_newton_schulz_runs_in_bfloat16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(optim, "native_bf16", lambda device: native)
    model, _, _ = model_and_batch()
    assert combined(model, ns_dtype=None).ns_dtype == (torch.bfloat16 if native else torch.float32)


def test_float32_newton_schulz_steps_like_muon_within_bfloat16_rounding():
    # The float32 iteration is Muon's iteration computed more exactly: its steps stay within bfloat16's
    # rounding of torch.optim.Muon's, skipping through found_inf changes nothing, and it is not the bf16 path.
    model, x, y = model_and_batch()
    ref, skippable = copy.deepcopy(model), copy.deepcopy(model)
    runs = [(model, combined(model, True, torch.float32)), (ref, combined(ref, True)),
            (skippable, combined(skippable, True, torch.float32))]  # fmt: skip
    runs[2][1].found_inf = torch.tensor(0.0)
    for m, opt in runs:
        train(m, opt, x, y, 3)
    matrices = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    for (name, a), b, c in zip(model.named_parameters(), ref.parameters(), skippable.parameters()):
        assert torch.equal(a, c), name
        if name in matrices:
            assert not torch.equal(a, b), name
            torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_a_scheduler_drives_both_halves():
    model, x, y = model_and_batch()
    opt = combined(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, x, y, 2, sched)
    assert [g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups] == [pytest.approx(2.5e-3)] * 3


def test_state_dict_resumes_exactly():
    model, x, y = model_and_batch()
    opt = combined(model)
    train(model, opt, x, y, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved_opt["state"]) == sum(1 for _ in model.parameters())  # momenta of both halves
    train(model, opt, x, y, 2)

    again, _, _ = model_and_batch(seed=1)
    again.load_state_dict(saved_model)
    opt2 = combined(again)
    opt2.load_state_dict(saved_opt)
    train(again, opt2, x, y, 2)
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    assert opt2.muon.state is opt2.adamw.state is opt2.state  # still shared after loading


@pytest.mark.parametrize("first_step", [False, True], ids=["with-momentum", "first-step"])
@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_found_inf_skips_the_whole_step_on_the_device(bad, first_step):
    model, x, y = model_and_batch()
    opt = combined(model, fused=True)
    if not first_step:
        train(model, opt, x, y, 1)  # momenta exist
    before = copy.deepcopy(model.state_dict())
    matrices = opt.muon.param_groups[0]["params"]
    momenta = {id(p): opt.state[p]["momentum_buffer"].clone() if p in opt.state else torch.zeros_like(p)
               for p in matrices}  # fmt: skip
    model.loss(x, y).backward()
    opt.found_inf = torch.tensor(bad)
    opt.step()
    changed = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}
    moved = [not torch.equal(opt.state[p]["momentum_buffer"], momenta[id(p)]) for p in matrices]
    if bad:
        assert not any(changed.values()) and not any(moved)
        # Bit for bit: the same bytes, not only equal values (-0.0 == 0.0 as numbers).
        for n, p in model.named_parameters():
            assert p.view(torch.int32).equal(before[n].view(torch.int32)), n
    else:
        assert all(changed.values()) and all(moved)


def test_lit_module_builds_muon_with_adamw_for_the_rest():
    cfg = GPTConfig.tiny(vocab_size=50, block_size=8)
    lit = LitMiniGPT(cfg, optimizer="muon", lr=3e-3, weight_decay=0.1, scheduler="constant", muon_momentum=0.9,
                     muon_ns_steps=3)  # fmt: skip
    opt = lit.configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonWithAdamW)
    assert (opt.muon.param_groups[0]["momentum"], opt.muon.param_groups[0]["ns_steps"]) == (0.9, 3)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {id(p) for p in hidden_matrices(lit.model)}
    c_attn = {id(block.attn.c_attn.weight) for block in lit.model.transformer.h}
    assert opt._qkv == {id(p) for p in fused_qkv(lit.model)} == c_attn
    assert muon.isdisjoint(adamw) and muon | adamw == {id(p) for p in lit.parameters()}
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.1, 0.0]


def test_muons_share_is_the_blocks_matrices_and_the_bigram_projection():
    cfg = GPTConfig.tiny(vocab_size=50, block_size=8, bigram_buckets=16, bigram_dim=4, n_layer=2)
    model = LitMiniGPT(cfg).model
    share = {id(p) for p in hidden_matrices(model)}
    blocks = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    assert share == blocks | {id(model.transformer.bigram_proj.weight)}
    assert id(model.transformer.bigram.weight) not in share  # a table of rows, not a map of features
    without = LitMiniGPT(GPTConfig.tiny(vocab_size=50, block_size=8)).model
    assert {id(p) for p in hidden_matrices(without)} == {
        id(p) for p in without.transformer.h.parameters() if p.dim() == 2
    }


@pytest.mark.parametrize("tie_weights", [True, False])
def test_muons_share_takes_the_adaptive_clusters_projections_not_their_word_vectors(tie_weights):
    adaptive = {"head": "adaptive", "adaptive_cutoffs": [10, 30], "tie_weights": tie_weights}
    cfg = GPTConfig.tiny(vocab_size=50, block_size=8, **adaptive)
    model = LitMiniGPT(cfg).model
    share = {id(p) for p in hidden_matrices(model)}
    blocks = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    projections = {id(projection.weight) for projection, _ in model.adaptive.tail}
    assert len(projections) == 2 and share == blocks | projections
    rows = [model.adaptive.head.weight] + [output.weight for _, output in model.adaptive.tail]
    assert all(id(p) not in share for p in rows)


def test_adamw_lr_sets_the_adamw_half_and_the_schedule_scales_both():
    cfg = GPTConfig.tiny(vocab_size=50, block_size=8)
    lit = LitMiniGPT(cfg, optimizer="muon", lr=1e-2, adamw_lr=3e-2, scheduler="constant", warmup_steps=4)
    built = lit.configure_optimizers()
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(1e-2 / 4)]  # warmup's first step
    assert [g["lr"] for g in opt.adamw.param_groups] == [pytest.approx(3e-2 / 4)] * 2
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-2), pytest.approx(3e-2), pytest.approx(3e-2)]


@pytest.mark.parametrize("kwargs", [{"optimizer": "adamw", "adamw_lr": 1e-2}, {"optimizer": "muon", "adamw_lr": 0.0}])
def test_adamw_lr_is_refused_where_it_means_nothing(kwargs):
    from minigpt.errors import UserError

    with pytest.raises(UserError, match="model.adamw_lr sets the AdamW half of model.optimizer muon"):
        LitMiniGPT(GPTConfig.tiny(vocab_size=50, block_size=8), **kwargs)


def test_muon_is_refused_with_a_sharding_strategy():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from minigpt.errors import UserError

    lit = LitMiniGPT(GPTConfig.tiny(vocab_size=50, block_size=8), optimizer="muon", scheduler="constant")
    lit.trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UserError, match="use --trainer.strategy ddp or --model.optimizer adamw"):
        lit.configure_optimizers()
