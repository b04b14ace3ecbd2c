"""bf16 (the path every GPU user takes) and torch.compile, tested on CPU.

- the training step and the chunked loss under `torch.autocast("cpu", dtype=torch.bfloat16)` against float32,
  within tolerances stated at each assertion (bf16 keeps 8 bits of mantissa: about 3 significant digits);
- `minigpt fit --trainer.precision bf16-mixed` and `minigpt fit --model.compile true|auto` end to end, tiny.
"""

import warnings
from pathlib import Path

import pytest
import torch
from conftest import review

from minigpt import lit_module
from minigpt.cli import main
from minigpt.config import GPTConfig
from minigpt.model import GPT, lm_loss

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
IGNORE = -100


def tiny(loss_kernel: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(vocab_size=48, block_size=12, **overrides), loss_kernel=loss_kernel)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 48, (4, 12), generator=g), torch.randint(0, 48, (4, 12), generator=g)
    targets[1, 7:] = IGNORE
    return idx, targets


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# configs/imdb.yaml's model at tiny sizes: RMSNorm, rotary positions, QK-norm, ReLU², the adaptive head and input.
RECIPE_BLOCK = dict(
    norm_first=True, positional="rotary", norm="rmsnorm", activation="relu2", qk_norm=True, zero_init_proj=True,
    bias=False, head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True, scale_embedding=True, bigram_buckets=64,
    bigram_dim=8,
)


@pytest.mark.parametrize("loss_kernel", ["plain", "fused"])
@pytest.mark.parametrize(
    "arch",
    [
        dict(),
        dict(norm_first=True, positional="learned", tie_weights=True),
        dict(norm_first=True, positional="learned", head="adaptive", adaptive_cutoffs=(8, 20)),
        dict(norm_first=True, positional="learned", head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True),
        RECIPE_BLOCK,
    ],
    ids=["seed", "gpt2", "adaptive", "adaptive-input", "recipe"],
)
def test_training_step_under_bf16_autocast_matches_float32(loss_kernel, arch):
    idx, targets = batch()
    models = {"fp32": tiny(loss_kernel, **arch), "bf16": tiny(loss_kernel, **arch)}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for k, m in models.items()}
    losses = {}
    for name, model in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            losses[name] = model.loss(idx, targets)
        losses[name].backward()
    # Loss: within 1% (bf16 rounds every product's inputs to 3 significant digits).
    assert losses["bf16"].dtype == torch.float32
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=1e-2, atol=0)
    # Gradients: float32 like the weights. bf16 error is spread out but a ReLU whose input is near zero may
    # flip, so compare norms: all gradients together within 6% (relative L2 error; about 4% measured), each
    # parameter's within 15% (about 10% measured for the first MLP).
    grads = {k: [p.grad for p in m.parameters()] for k, m in models.items()}
    assert all(g.dtype == torch.float32 for g in grads["bf16"])
    flat = {k: torch.cat([g.flatten() for g in gs]) for k, gs in grads.items()}
    assert (flat["bf16"] - flat["fp32"]).norm() <= 0.06 * flat["fp32"].norm()
    for (name, _), g16, g32 in zip(models["fp32"].named_parameters(), grads["bf16"], grads["fp32"]):
        assert (g16 - g32).norm() <= 0.15 * g32.norm(), name
    # One Adam step moves each weight by at most about lr = 1e-3 whatever the gradient's size; the two runs'
    # steps point the same way (cosine similarity >= 0.95).
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in models.items()}
    for opt in optimizers.values():
        opt.step()
    steps = {k: torch.cat([(p - b).flatten() for p, b in zip(m.parameters(), before[k])]) for k, m in models.items()}
    assert steps["bf16"].abs().max() <= 1.001e-3 and steps["fp32"].abs().max() <= 1.001e-3
    assert torch.nn.functional.cosine_similarity(steps["bf16"], steps["fp32"], dim=0) >= 0.95


@pytest.mark.parametrize("loss_kernel", ["plain", "fused"])
def test_chunked_loss_under_bf16_autocast_equals_the_full_logits_loss(loss_kernel):
    # Chunking only splits rows: under autocast each row's logits are the same bf16 products either way.
    model = tiny(loss_kernel)
    idx, targets = batch(seed=2)
    with bf16():
        full = lm_loss(model(idx), targets)
        for chunk_size in (None, 5, 1):
            torch.testing.assert_close(model.loss(idx, targets, chunk_size=chunk_size), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, lm_loss(model(idx), targets), rtol=1e-2, atol=0)  # vs float32: 1%


def test_adaptive_head_under_bf16_autocast():
    # The adaptive head runs in float32 under autocast (see model._float32): exact normalised log-probabilities.
    model = tiny("plain", head="adaptive", adaptive_cutoffs=(8, 20), tie_weights=True, norm_first=True)
    idx, _ = batch(seed=3)
    with bf16():
        log_probs = model(idx)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(4, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(log_probs.exp(), model(idx).exp(), atol=1e-2, rtol=0)  # vs float32


def test_recipe_block_under_bf16_autocast_warns_nothing():
    # The q/k projections come out of autocast in bf16 while the norms' weights are float32: the norms compute
    # in float32 and hand back bf16 (torch's fused RMSNorm refuses the mixed pair with a warning on every run).
    model = tiny("fused", **RECIPE_BLOCK)
    idx, targets = batch(seed=4)
    normed = {}
    q_norm = model.transformer.h[0].attn.q_norm
    handle = q_norm.register_forward_hook(lambda m, args, out: normed.update(q=(args[0], out)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bf16():
            loss = model.loss(idx, targets)
        loss.backward()
    handle.remove()
    q_in, q_out = normed["q"]
    assert q_in.dtype == q_out.dtype == torch.bfloat16
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(review(i, 12 + (i % 5) * 4) for i in range(60)))
    return p


def fit(corpus, *extra):
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
          "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip
    return torch.load(Path("lightning_logs/version_0/checkpoints/last.ckpt"), weights_only=True)


def test_fit_bf16_mixed(corpus):
    # Every Linear layer's output dtype while the run's training steps go forward (a hook on all modules).
    seen: dict[str, set] = {"train": set(), "other": set()}

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            seen["train" if torch.is_grad_enabled() and module.training else "other"].add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = fit(corpus, "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "6",
                       "--trainer.val_check_interval", "3", "--model.config.norm_first", "true",
                       "--model.config.norm", "rmsnorm", "--model.config.qk_norm", "true",
                       "--trainer.enable_model_summary", "true")  # fmt: skip
    finally:
        handle.remove()
    # Neither the recipe's block nor Lightning's model summary has anything to say about bf16-mixed.
    assert [str(w.message) for w in caught if "bf16" in str(w.message).lower() or "dtype" in str(w.message)] == []
    assert seen["train"] == {torch.bfloat16}  # the training matmuls ran in bf16 under the run's autocast
    assert torch.bfloat16 in seen["other"]  # and so did validation
    assert ckpt["global_step"] == 6
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)  # bf16-mixed keeps fp32 weights
    assert ckpt["hyper_parameters"]["loss_kernel"] == "auto"


def test_fit_with_compile(corpus):
    # Inductor on CPU generates C++ and needs a compiler; without one this test cannot run here.
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler (gcc/cc), none is installed")
    from torch._dynamo.utils import counters

    counters.clear()
    ckpt = fit(corpus, "--model.compile", "true", "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000")
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did go through torch.compile
    assert ckpt["global_step"] == 2
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # compiled in place: the usual keys


@pytest.mark.parametrize(
    "setting, available, expected",
    [(False, True, False), (True, True, True), ("auto", True, True), ("auto", False, False)],
)
def test_compile_setting(monkeypatch, caplog, setting, available, expected):
    probed = []
    monkeypatch.setattr(lit_module, "can_compile", lambda device: probed.append(device) or available)
    with caplog.at_level("INFO", logger="minigpt.lit_module"):
        assert lit_module.should_compile(setting, torch.device("cpu")) is expected
    assert probed == ([] if setting is False else [torch.device("cpu")])  # false never probes the machine
    said = "training without torch.compile: it needs a C++ compiler (g++ or clang++) on cpu"
    assert (said in caplog.text) is (setting == "auto" and not available)


def test_compile_elsewhere_is_left_to_torch_for_true_and_off_for_auto(monkeypatch, caplog):
    monkeypatch.setattr(lit_module, "can_compile", lambda device: pytest.fail("only CPUs and CUDA GPUs are probed"))
    with caplog.at_level("INFO", logger="minigpt.lit_module"):
        assert lit_module.should_compile(True, torch.device("mps")) is True
        assert lit_module.should_compile("auto", torch.device("mps")) is False
    assert "compile auto compiles on CPUs and CUDA GPUs, not on mps" in caplog.text


def test_fit_refuses_compile_true_where_it_cannot_build_and_runs_auto_without_it(corpus, monkeypatch, capsys):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(lit_module, "can_compile", lambda device: False)
    with pytest.raises(SystemExit) as e:
        fit(corpus, "--model.compile", "true", "--trainer.max_steps", "2")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.compile true needs a C++ compiler (g++ or clang++)" in err
    assert "Traceback" not in err and not Path("lightning_logs").exists()  # refused before the run began
    counters.clear()
    ckpt = fit(corpus, "--model.compile", "auto", "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000")
    assert ckpt["global_step"] == 2 and counters["stats"]["unique_graphs"] == 0  # trained, nothing compiled
    assert ckpt["hyper_parameters"]["compile"] == "auto"


def test_compile_refuses_a_setting_it_does_not_know(corpus, capsys):
    with pytest.raises(SystemExit) as e:
        fit(corpus, "--model.compile", "sometimes")
    assert e.value.code == 2 and "compile" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_fit_trains_in_bf16_only_where_the_hardware_computes_it(native, monkeypatch, capsys):
    # A config without trainer.precision gets bf16-mixed where bfloat16 is native and float32 where it would be
    # emulated; the tutorial's recipe pins float32 whatever the hardware.
    from minigpt.commands import train

    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    for recipe, expected in (("tiny", "bf16-mixed" if native else "32-true"), ("seed", "32-true")):
        with pytest.raises(SystemExit):
            main(["fit", "--config", recipe, "--print_config"])
        assert f"precision: {expected}\n" in capsys.readouterr().out, recipe
