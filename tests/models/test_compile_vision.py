"""``ImageClassifier(compile=...)``: the backbone with PatchDropout inside goes through
``torch.compile``. The eager model is the reference: same weights, same seeds, same losses.

On the CPU the tests trace with the ``aot_eager`` / ``eager`` backends (Dynamo + AOTAutograd
without code generation, a second or two); code generation (inductor) is checked on the GPU and,
marked slow, on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from models.image_classifier import ImageClassifier, compile_backbone

DEIT, SWIN = "deit_fmnist_tiny_patch4_28", "swin_fmnist_tiny_patch2_window7_28"


def pair(backbone: str, device: str = "cpu", **options) -> tuple[ImageClassifier, ImageClassifier]:
    """An eager model and a compiled one with the same weights."""
    torch.manual_seed(0)
    eager = ImageClassifier(backbone, in_chans=1, **options).to(device)
    compiled = ImageClassifier(backbone, in_chans=1, compile=True, **options).to(device)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def losses(model: ImageClassifier, steps: int, batch: int = 8, device: str = "cpu", bf16: bool = False,
           seed: int = 1) -> list[float]:
    """Training losses of ``steps`` SGD steps on fixed random images, every step seeded alike."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    out = []
    for step in range(steps):
        torch.manual_seed(seed + step)  # the same drawn keep rate and kept tokens in both models
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backbone, schedule, keep", [
    (DEIT, "fixed", 0.5),
    pytest.param(DEIT, "random", 1.0, marks=pytest.mark.slow),
    pytest.param(SWIN, "fixed", 0.5, marks=pytest.mark.slow),
    pytest.param(SWIN, "random", 1.0, marks=pytest.mark.slow)])
def test_compiled_training_matches_eager(backbone, schedule, keep) -> None:
    eager, compiled = pair(backbone, keep_rate=keep, keep_rate_schedule=schedule, compile_backend="aot_eager")
    expected = losses(eager, 4)
    got = losses(compiled, 4)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert compiled.backbone.patch_drop.last_keep_rate == eager.backbone.patch_drop.last_keep_rate
    assert compiled.backbone.patch_drop.last_tokens == eager.backbone.patch_drop.last_tokens
    assert not counters["graph_break"]  # PatchDropout traces into the backbone's graph
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(images), eager.eval()(images), rtol=1e-5, atol=1e-6)


def test_random_schedule_compiles_once_per_drawn_rate() -> None:
    """A graph per keep rate the schedule draws, none for a rate seen before (fast: 6 steps)."""
    model = ImageClassifier(DEIT, in_chans=1, keep_rate_schedule="random", compile=True,
                            compile_backend="eager").train()
    images = torch.randn(2, 1, 28, 28)
    torch.manual_seed(2)  # draws 0.6, 1.0, 1.0, 0.85, 1.0, 1.0
    rates = []
    for _ in range(6):
        model(images)
        rates.append(model.backbone.patch_drop.last_keep_rate)
        assert counters["stats"]["unique_graphs"] == len(set(rates))
    assert len(set(rates)) < len(rates)  # some rates came twice (1.0 has probability 1/2)
    assert not counters["graph_break"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [DEIT, SWIN])
def test_random_schedule_compiles_once_per_keep_rate(backbone) -> None:
    """The reference schedule has 11 keep rates: one graph each, then no more recompiles."""
    model = ImageClassifier(backbone, in_chans=1, keep_rate_schedule="random", compile=True,
                            compile_backend="eager").train()
    images = torch.randn(2, 1, 28, 28)
    torch.manual_seed(0)
    rates, draws = set(), 0
    while len(rates) < 11 and draws < 500:
        model(images)
        rates.add(model.backbone.patch_drop.last_keep_rate)
        draws += 1
    assert rates == {1.0 - i / 20 for i in range(11)}
    assert counters["stats"]["unique_graphs"] == 11
    for _ in range(30):  # every rate seen: no recompile
        model(images)
    with torch.no_grad():
        model.eval()(images)  # eval: one more graph (every patch)
    assert counters["stats"]["unique_graphs"] == 12
    assert not counters["graph_break"]


def test_dynamic_batch_matches_eager() -> None:
    """compile_dynamic: one graph for two batch sizes, eager's result under the same seed."""
    eager, compiled = pair(DEIT, keep_rate=0.5, compile_backend="eager", compile_dynamic=True)
    for batch in (2, 3):
        images = torch.randn(batch, 1, 28, 28)
        torch.manual_seed(batch)
        expected = eager.train()(images)
        torch.manual_seed(batch)
        torch.testing.assert_close(compiled.train()(images), expected, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_state_dict_is_the_same_with_and_without_compile(tmp_path) -> None:
    eager, compiled = pair(DEIT, keep_rate=0.5, compile_backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all("_orig_mod" not in key for key in compiled.state_dict())
    # A checkpoint written through a `torch.compile(module)` wrapper loads into both.
    wrapped = {key.replace("backbone.", "backbone._orig_mod.", 1): value for key, value in eager.state_dict().items()}
    for model in (eager, compiled):
        checkpoint = {"state_dict": dict(wrapped)}
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])


@pytest.mark.parametrize("value", ["fast", "max_autotune"])
def test_bad_compile_mode_names_the_field(value) -> None:
    with pytest.raises(ValueError, match="compile must be"):
        ImageClassifier(DEIT, in_chans=1, compile=value)


def test_model_summary_flops_do_not_compile() -> None:
    """The FLOP counter of the model summary runs the eager backbone (no extra graph)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ImageClassifier(DEIT, in_chans=1, keep_rate=0.5, compile=True, compile_backend="eager").eval()
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(model.example_input_array)
    assert flops.get_total_flops() > 0
    assert counters["stats"]["unique_graphs"] == 0


def test_lightning_fit_with_compile(tmp_path) -> None:
    """A Lightning fit (train and validation) with compile on: two graphs, the step logs its tokens."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    model = ImageClassifier(DEIT, in_chans=1, keep_rate=0.5, compile=True, compile_backend="eager")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert trainer.callback_metrics["train/tokens_kept"].item() == 24  # int(49 * 0.5)
    assert counters["stats"]["unique_graphs"] == 2  # train at keep 0.5, eval


@pytest.mark.slow
def test_inductor_on_cpu_matches_eager() -> None:
    """Code generation on the CPU (needs a C++ compiler; tens of seconds)."""
    eager, compiled = pair(DEIT, keep_rate=0.5)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):  # eager's random numbers: same kept tokens
        got = losses(compiled, 3)
    assert got == pytest.approx(losses(eager, 3), rel=1e-4, abs=1e-5)


def bf16_trajectories(backbone: str, mode: bool | str, steps: int = 5, **options):
    import torch._inductor.config as inductor_config

    eager, compiled = pair(backbone, "cuda", **options)
    compile_backbone(compiled.backbone, mode)  # the mode under test (pair compiled with True)
    images = torch.randn(16, 1, 28, 28, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # eval: every patch, compiled
        logits = compiled.eval()(images).float(), eager.eval()(images).float()
    expected = losses(eager, steps, batch=32, device="cuda", bf16=True)
    with inductor_config.patch(fallback_random=True):
        got = losses(compiled, steps, batch=32, device="cuda", bf16=True)
    return expected, got, logits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backbone, mode, schedule, keep", [
    ("deit_fmnist_small_patch4_28", True, "fixed", 0.5),
    ("deit_fmnist_small_patch4_28", "reduce-overhead", "fixed", 0.25),
    ("swin_fmnist_tiny_patch2_window7_28", True, "fixed", 0.5),
])
def test_gpu_compiled_bf16_loss_trajectory_matches_eager(backbone, mode, schedule, keep) -> None:
    """Same weights, same kept tokens (inductor's fallback_random): losses agree to bf16 noise.
    (The random schedule compiles 11 graphs: the benchmark's compiled random row runs it.)"""
    expected, got, (compiled_logits, eager_logits) = bf16_trajectories(
        backbone, mode, keep_rate=keep, keep_rate_schedule=schedule)
    # CUDA graphs replay eager's random ops from the graph-safe generator state; should its
    # draws not line up with eager's, the kept tokens differ: a looser band (sampling noise)
    tolerance = 5e-2 if mode == "reduce-overhead" else 2e-2
    assert got == pytest.approx(expected, rel=tolerance, abs=tolerance)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=5e-2, atol=5e-2)
    assert min(expected[1:]) < expected[0]  # it trains
