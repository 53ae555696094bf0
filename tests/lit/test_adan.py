"""Adan (lit.optim.adan) against a float64 re-derivation of the equations in methods.md s.4."""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit.module import LitModule
from lit.optim import Adan
from lit.optim.adan import adan_foreach, adan_single_tensor
from tests.conftest import CONFIGS, FMNIST_DIR, needs_fmnist

SHAPES = [(7, 5), (33,), (4, 3, 3, 2), (1,), (2100,)]
STEPS = 25


# ---------------------------------------------------------------- the independent reference
def reference_adan(params, grad_steps, groups, max_grad_norm=0.0, clip_eps=1e-8):
    """Adan in float64, written from the equations (methods.md s.4), one dict per group.

    params: list of float64 tensors (modified copies are returned); grad_steps[t][i] the grad
    of param i at step t+1; groups: list of (indices, hyperparameter dict).
    """
    p = [x.clone().double() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    n = [torch.zeros_like(x) for x in p]
    g_prev = [None] * len(p)
    for t, raw in enumerate(grad_steps, start=1):
        raw = [g.double() for g in raw]
        scale = 1.0
        if max_grad_norm > 0:
            total = math.sqrt(sum(float((g ** 2).sum()) for g in raw))
            scale = min(1.0, max_grad_norm / (total + clip_eps))
        for indices, h in groups:
            b1, b2, b3 = h["betas"]
            lr, wd, eps = h["lr"], h["weight_decay"], h["eps"]
            for i in indices:
                g = raw[i] * scale
                diff = g - (g if t == 1 else g_prev[i])
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * diff
                n[i] = b3 * n[i] + (1 - b3) * (g + b2 * diff) ** 2
                den = torch.sqrt(n[i]) / math.sqrt(1 - b3 ** t) + eps
                if h["no_prox"]:
                    p[i] = p[i] * (1 - lr * wd)
                p[i] = p[i] - lr / (1 - b1 ** t) * m[i] / den - lr * b2 / (1 - b2 ** t) * v[i] / den
                if not h["no_prox"]:
                    p[i] = p[i] / (1 + lr * wd)
                g_prev[i] = g
    return p


def random_problem(seed: int, steps: int = STEPS):
    """Float32 params and a sequence of float32 grads (varying scale, so clipping engages)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * (0.5 + t % 3) for s in SHAPES]
             for t in range(steps)]
    return params, grads


DEFAULT = dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, no_prox=False)
CASES = {
    "plain": ([DEFAULT], 0.0),
    "wd-prox": ([{**DEFAULT, "weight_decay": 0.02}], 0.0),
    "wd-no_prox": ([{**DEFAULT, "weight_decay": 0.05, "no_prox": True}], 0.0),
    "clip": ([{**DEFAULT, "weight_decay": 0.02}], 5.0),
    "groups-clip": ([{**DEFAULT, "lr": 3e-2, "weight_decay": 0.1},
                     {**DEFAULT, "betas": (0.9, 0.8, 0.95), "weight_decay": 0.02, "no_prox": True},
                     {**DEFAULT, "lr": 1e-3, "eps": 1e-3}], 8.0),
}


def split(n_params: int, n_groups: int) -> list[list[int]]:
    return [list(range(n_params))[k::n_groups] for k in range(n_groups)]


def run_optimizer(params0, grads, hypers, max_grad_norm, **impl):
    params = [nn.Parameter(x.clone()) for x in params0]
    groups = [{"params": [params[i] for i in idx], **h}
              for idx, h in zip(split(len(params), len(hypers)), hypers)]
    opt = Adan(groups, max_grad_norm=max_grad_norm, **impl)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, step_grads):
            assert torch.equal(p.grad, g)  # the step leaves p.grad unchanged
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {}],
                         ids=["single", "foreach", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case, impl):
    hypers, max_grad_norm = CASES[case]
    params0, grads = random_problem(seed=len(case))
    ours, _ = run_optimizer(params0, grads, hypers, max_grad_norm, **impl)
    groups = list(zip(split(len(params0), len(hypers)), hypers))
    ref = reference_adan(params0, grads, groups, max_grad_norm)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6)
    # The update moved the params by many lr-sized steps, so the comparison is not vacuous.
    assert max((a.double() - p.double()).abs().max() for a, p in zip(ours, params0)) > 0.05


def test_single_and_foreach_agree_to_float32_rounding():
    hypers, max_grad_norm = CASES["groups-clip"]
    params0, grads = random_problem(seed=3)
    single, _ = run_optimizer(params0, grads, hypers, max_grad_norm, foreach=False)
    multi, _ = run_optimizer(params0, grads, hypers, max_grad_norm, foreach=True)
    for a, b in zip(single, multi):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", ["plain", "wd-prox", "wd-no_prox", "groups-clip"])
def test_timms_adan_is_close_but_not_bit_equal(case, foreach):
    """Why timm's Adan is not our non-fused fallback (docs/adan.md): it updates m with lerp_,
    which rounds differently from the reference's mul_/add_, and it has no global clipping
    (the "groups-clip" case is run without clipping on both sides)."""
    from timm.optim import Adan as TimmAdan

    hypers, _ = CASES[case]
    params0, grads = random_problem(seed=len(case))
    ours, _ = run_optimizer(params0, grads, hypers, 0.0, foreach=foreach)
    params = [nn.Parameter(x.clone()) for x in params0]
    timm_opt = TimmAdan([{"params": [params[i] for i in idx], **h}
                         for idx, h in zip(split(len(params), len(hypers)), hypers)], foreach=foreach)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        timm_opt.step()
    for a, b in zip(ours, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)  # the same algorithm
    assert not all(torch.equal(a, b.detach()) for a, b in zip(ours, params))  # not the same rounding
    assert "max_grad_norm" not in inspect.signature(TimmAdan).parameters


def _load_interpreted_triton(monkeypatch):
    """A fresh copy of lit.optim.adan_triton whose kernel runs in Triton's CPU interpreter."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = Path(__file__).resolve().parents[2] / "lit" / "optim" / "adan_triton.py"
    spec = importlib.util.spec_from_file_location("adan_triton_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("no_prox", [False, True])
def test_triton_kernel_matches_reference_in_interpreter(monkeypatch, no_prox):
    """The fused kernel's arithmetic, run by Triton's interpreter on the CPU (the GPU test
    below runs the compiled kernel): full blocks, tail blocks, one-element tensors, clipping."""
    triton_mod = _load_interpreted_triton(monkeypatch)
    h = {**DEFAULT, "weight_decay": 0.03, "no_prox": no_prox}
    params0, grads = random_problem(seed=11, steps=STEPS)
    params = [x.clone() for x in params0]
    state = [[torch.zeros_like(x) for x in params] for _ in range(3)]
    neg_prev = [torch.zeros_like(x) for x in params]
    plan = triton_mod.FusedPlan(tuple(x.numel() for x in params), torch.device("cpu"))
    for t, step_grads in enumerate(grads, start=1):
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in step_grads]))
        clip = torch.clamp(4.0 / (total + 1e-8), max=1.0)
        if t == 1:
            neg_prev = [g * -clip for g in step_grads]
        triton_mod.adan_fused(plan, [params, step_grads, *state, neg_prev],
                              beta1=h["betas"][0], beta2=h["betas"][1], beta3=h["betas"][2],
                              lr=h["lr"], eps=h["eps"], weight_decay=h["weight_decay"],
                              no_prox=no_prox, step=t, clip=clip)
    ref = reference_adan(params0, grads, [(range(len(params0)), h)], max_grad_norm=4.0)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6)


def test_pure_functions_share_equations():
    """adan_single_tensor and adan_foreach on one step give the same state to rounding."""
    gen = torch.Generator().manual_seed(5)
    lists = [[torch.randn(s, generator=gen).abs() for s in SHAPES] for _ in range(6)]
    copies = [[x.clone() for x in ts] for ts in lists]
    kw = dict(beta1=0.9, beta2=0.9, beta3=0.99, lr=0.1, eps=1e-8, weight_decay=0.1,
              no_prox=True, step=4, clip=torch.tensor(0.5))
    adan_single_tensor(*lists, **kw)
    adan_foreach(*copies, **kw)
    for a_list, b_list in zip(lists, copies):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b)


def test_restart_opt_equals_fresh_optimizer():
    params0, grads = random_problem(seed=7, steps=10)
    params = [nn.Parameter(x.clone()) for x in params0]
    opt = Adan(params, lr=1e-2, weight_decay=0.02)
    for step_grads in grads[:5]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    opt.restart_opt()
    assert opt.param_groups[0]["step"] == 0
    midway = [p.detach().clone() for p in params]
    for step_grads in grads[5:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    fresh, _ = run_optimizer(midway, grads[5:], [{**DEFAULT, "weight_decay": 0.02}], 0.0)
    for a, b in zip(params, fresh):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_state_dict_round_trip_continues_identically():
    params0, grads = random_problem(seed=9, steps=12)
    hypers, max_grad_norm = CASES["groups-clip"]
    full, _ = run_optimizer(params0, grads, hypers, max_grad_norm)
    half, opt = run_optimizer(params0, grads[:6], hypers, max_grad_norm)
    saved = opt.state_dict()
    assert [g["step"] for g in saved["param_groups"]] == [6, 6, 6]
    params = [nn.Parameter(x.clone()) for x in half]
    groups = [{"params": [params[i] for i in idx], **h}
              for idx, h in zip(split(len(params), len(hypers)), hypers)]
    resumed = Adan(groups, max_grad_norm=max_grad_norm)
    resumed.load_state_dict(saved)
    for step_grads in grads[6:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        resumed.step()
    for a, b in zip(params, full):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


# ---------------------------------------------------------------- inside a real Trainer
class LinearProbe(LitModule):
    """Logistic regression on Fashion-MNIST pixels: small enough for an exact resume test."""

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer=optimizer)
        self.net = nn.Linear(28 * 28, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x.flatten(1)), y)


def _fmnist_loader() -> DataLoader:
    from datamodules.fashion_mnist import MEAN, STD, load_split

    images, labels = load_split(FMNIST_DIR, "test")
    x = (images[:256].float() / 255 - MEAN) / STD
    return DataLoader(TensorDataset(x, labels[:256]), batch_size=64, shuffle=False)


def _fit(max_epochs: int, root: Path, ckpt_path: str | None = None) -> Trainer:
    torch.manual_seed(0)
    model = LinearProbe(partial(Adan, lr=5e-3, weight_decay=0.02, max_grad_norm=1.0))
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, train_dataloaders=_fmnist_loader(), ckpt_path=ckpt_path)
    return trainer


@needs_fmnist
def test_trainer_checkpoint_resume_matches_uninterrupted(tmp_path):
    full = _fit(3, tmp_path / "full")
    first = _fit(1, tmp_path / "first")
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed = _fit(3, tmp_path / "resumed", ckpt_path=str(ckpt))
    opt = resumed.optimizers[0]
    assert isinstance(opt, Adan) and len(opt.param_groups) == 2  # decay / no-decay groups
    assert opt.param_groups[0]["step"] == 12  # 3 epochs x 4 batches, counted across the resume
    for a, b in zip(full.lightning_module.parameters(), resumed.lightning_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    initial = LinearProbe(None).net
    x, y = next(iter(_fmnist_loader()))
    with torch.no_grad():
        before = nn.functional.cross_entropy(initial(x.flatten(1)), y)
        after = nn.functional.cross_entropy(full.lightning_module.net(x.flatten(1)), y)
    assert after < 0.7 * before  # and it trains


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, field", [
    ({"lr": -1.0}, "lr"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"betas": (0.98, 0.92, 1.0)}, "betas"),
    ({"betas": (0.98, 0.92)}, "betas"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"no_prox": "yes"}, "no_prox"),
    ({"foreach": True, "fused": True}, "foreach/fused"),
    ({"fused": True}, "fused"),  # CPU params
])
def test_bad_hyperparameters_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        Adan([nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_group_hyperparameters_raise():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^param_groups\[1\]\.lr: "):
        Adan([{"params": [p]}, {"params": [q], "lr": -0.5}])
    with pytest.raises(ValueError, match=r"max_grad_norm: .*global"):
        Adan([{"params": [p], "max_grad_norm": 1.0}])


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_sparse_gradients_raise(max_grad_norm):
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = Adan(emb.parameters(), max_grad_norm=max_grad_norm)
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


# ---------------------------------------------------------------- CLI
def _cli(args: list[str], capsys) -> str:
    from lit.cli import main

    with pytest.raises(SystemExit):
        main(args)
    return capsys.readouterr().out


def test_cli_optimizer_shortcut_selects_adan(capsys):
    out = _cli(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--optimizer", "Adan",
                "--optimizer.lr", "0.01", "--print_config"], capsys)
    # The top-level optimizer replaces the model's AdamW (see lit.cli).
    assert re.search(r"^optimizer:\n  class_path: lit\.optim\.(adan\.)?Adan\n  init_args:\n"
                     r"    lr: 0\.01\n", out, flags=re.M), out


def test_quickstart_adan_config_parses(capsys):
    out = _cli(["fit", "--config", str(CONFIGS / "quickstart_adan.yaml"), "--print_config"],
               capsys)
    match = re.search(r"      class_path: lit\.optim\.(adan\.)?Adan\n      init_args:\n"
                      r"(        .*\n)+", out)
    assert match, out
    assert "        weight_decay: 0.02\n" in match.group(0)


@needs_fmnist
@pytest.mark.parametrize("select", [
    ["--config", str(CONFIGS / "quickstart_adan.yaml")],
    ["--config", str(CONFIGS / "quickstart.yaml"), "--optimizer", "Adan", "--optimizer.lr",
     "0.01", "--optimizer.weight_decay", "0.02"],
], ids=["quickstart_adan.yaml", "--optimizer Adan"])
def test_cli_short_run_trains_with_adan(tmp_path, select):
    from lit.cli import main

    cli = main(["fit", *select,
                "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                "--trainer.limit_test_batches=1", "--trainer.accelerator=cpu",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Adan)
    assert opt.param_groups[0]["step"] == 2
    assert opt.param_groups[0]["weight_decay"] == 0.02
    assert opt.param_groups[1]["weight_decay"] == 0.0  # the model's no-decay group
    assert all(len(opt.state[p]) == 4 for p in opt.param_groups[0]["params"])


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_path_matches_reference_path_on_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hypers, max_grad_norm = CASES[case]
    params0, grads = random_problem(seed=21)
    cuda = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    fused, opt = run_optimizer(cuda(params0), [cuda(g) for g in grads], hypers, max_grad_norm,
                               fused=True)
    assert opt._plans, "the fused kernel did not run"
    single, _ = run_optimizer(cuda(params0), [cuda(g) for g in grads], hypers, max_grad_norm,
                              foreach=False)
    auto, _ = run_optimizer(cuda(params0), [cuda(g) for g in grads], hypers, max_grad_norm)
    groups = list(zip(split(len(params0), len(hypers)), hypers))
    ref = reference_adan(params0, grads, groups, max_grad_norm)
    for f, s, a, r in zip(fused, single, auto, ref):
        torch.testing.assert_close(f, s)                      # float32 rounding
        torch.testing.assert_close(a, f, rtol=0, atol=0)      # auto picks the fused kernel
        torch.testing.assert_close(f.double().cpu(), r, rtol=2e-5, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_path_low_precision_params_on_cuda(dtype):
    """bf16/fp16 params keep their state in the param dtype (as the reference does). The kernel
    computes in fp32 and rounds once per tensor, so it is at least as close to the float64
    reference as the torch path, which rounds after every op (and whose fp16 n underflows to 0
    for small grads, giving inf/NaN where the kernel stays finite)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    params0, grads = random_problem(seed=23)
    params0 = [x.to(dtype) for x in params0]
    grads = [[g.to(dtype) for g in gs] for gs in grads]
    cuda = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    hypers = [{**DEFAULT, "weight_decay": 0.02}]
    fused, _ = run_optimizer(cuda(params0), [cuda(g) for g in grads], hypers, 2.0, fused=True)
    torch_path, _ = run_optimizer(cuda(params0), [cuda(g) for g in grads], hypers, 2.0,
                                  foreach=False)
    ref = reference_adan(params0, grads, [(range(len(params0)), hypers[0])], max_grad_norm=2.0)
    for f, t, r in zip(fused, torch_path, ref):
        assert f.dtype == dtype and torch.isfinite(f).all()
        err_fused = (f.double().cpu() - r).abs().mean().item()
        err_torch = (t.double().cpu() - r).abs().nan_to_num(1e9, 1e9, 1e9).mean().item()
        assert err_fused <= 1.1 * err_torch + 1e-4, (err_fused, err_torch)
        assert err_fused < 0.05
