"""A&D's networks and steps: Diff-VNet, the label diffusion, the training steps, the configs.

Sizes are tiny (width-4 VNets on 16^3 crops); the references are the official
``xmed-lab/GenericSSL`` code (``code/DiffVNet/diff_vnet.py``, ``guided_diffusion``,
``code/train_diffusion.py``), transcribed by hand where a test needs them.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medssl.cli.train import resolve_config
from medssl.config import load_config, parse_overrides
from medssl.errors import ConfigError
from medssl.training.methods.ad import ad_step, gaussian_smooth
from medssl.training.methods.base import ema_update
from medssl.training.methods.common import rampup
from medssl.training.methods.mean_teacher import mean_teacher_step
from medssl.training.methods.supervised_seg import supervised_seg_step
from medssl.training.networks.diffusion import LabelDiffusion, label_to_x0, spaced_steps
from medssl.training.networks.vnet import DiffVNet, VNet, VNetConfig, timestep_embedding
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.drs import DifficultyWeights

W, C = 4, 3  # network width, classes (background included)
SHAPE = (16, 16, 16)


pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]


def image(batch=2, seed=0) -> torch.Tensor:
    return torch.randn((batch, 1, *SHAPE), generator=torch.Generator().manual_seed(seed))


def label(batch=2, seed=0) -> torch.Tensor:
    return torch.randint(0, C, (batch, *SHAPE), generator=torch.Generator().manual_seed(seed))


def diff_vnet(diffusion=True, seed=0) -> DiffVNet:
    torch.manual_seed(seed)
    return DiffVNet(VNetConfig(width=W), C, diffusion=diffusion)


def experiment(*overrides: str, method="ad") -> SegmentationExperiment:
    return load_config(
        SegmentationExperiment,
        resolve_config("seg-ssl-cpu"),
        {**parse_overrides(["model.width=4", "optim.steps=10", *overrides]), "method": method},
    )


# ---------------------------------------------------------------- Diff-VNet


def test_every_branch_returns_class_logits_on_the_input_grid():
    net = diff_vnet()
    x, u = image(), image(seed=1)
    x_t, t = label_to_x0(label(), C), torch.tensor([3, 999])
    assert net(x).shape == (2, C, *SHAPE)
    assert net.denoise(x_t, t, x).shape == (2, C, *SHAPE)
    assert net.psi(x).shape == (2, C, *SHAPE)
    xi, psi, theta = net(x, x_t=x_t, t=t, unlabeled=torch.cat([u, u, u]))
    assert xi.shape == psi.shape == (2, C, *SHAPE) and theta.shape == (6, C, *SHAPE)


def test_inference_forward_is_the_theta_decoder():
    net = diff_vnet().eval()
    x = image()
    torch.testing.assert_close(net(x), net.theta(x))
    torch.testing.assert_close(net(x), net.decoder_theta(net.image_features(x)))


def test_the_diffusion_branch_needs_a_noisy_label_and_a_step():
    with pytest.raises(ValueError, match="x_t and t"):
        diff_vnet().denoise(None, None, image())


def test_the_denoiser_depends_on_the_noisy_label_and_the_step():
    net = diff_vnet().eval()
    x, x_t = image(), label_to_x0(label(), C)
    ref = net.denoise(x_t, torch.tensor([10, 10]), x)
    assert not torch.allclose(ref, net.denoise(-x_t, torch.tensor([10, 10]), x))
    assert not torch.allclose(ref, net.denoise(x_t, torch.tensor([900, 900]), x))


def test_encoder_has_four_downsamplings_from_w_to_16w():
    net = diff_vnet().eval()
    features = net.image_features(image())
    assert [f.shape[1] for f in features] == [W, 2 * W, 4 * W, 8 * W, 16 * W]
    assert [tuple(f.shape[2:]) for f in features] == [
        tuple(s // 2**i for s in SHAPE) for i in range(5)
    ]
    assert [
        f.shape[1] for f in VNet(VNetConfig(width=W), C).eval().encoder(torch.zeros(1, W, *SHAPE))
    ] == [W, 2 * W, 4 * W, 8 * W, 16 * W]


def test_without_diffusion_nothing_is_time_conditioned():
    net = diff_vnet(diffusion=False)
    assert net.time_mlp is None
    assert not [n for n, _ in net.named_parameters() if ".time." in n or n.startswith("time")]
    assert net.noisy_stem.convs[0].conv.in_channels == 1  # the image alone
    with_diffusion = diff_vnet()
    assert with_diffusion.noisy_stem.convs[0].conv.in_channels == 1 + C  # image + noisy label
    assert any(".time." in n for n, _ in with_diffusion.decoder_xi.named_parameters())
    assert not any(".time." in n for n, _ in with_diffusion.decoder_theta.named_parameters())
    assert not any(".time." in n for n, _ in with_diffusion.decoder_psi.named_parameters())


@pytest.mark.parametrize("diffusion", [True, False])
def test_the_training_forward_uses_every_parameter(diffusion):
    """DDP with find_unused_parameters=False needs a gradient for every parameter."""
    net = diff_vnet(diffusion)
    x = image()
    x_t, t = (label_to_x0(label(), C), torch.tensor([5, 500])) if diffusion else (None, None)
    outputs = net(x, x_t=x_t, t=t, unlabeled=image(seed=1))
    sum(o.sum() for o in outputs).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused


# ---------------------------------------------------------------- theta <- EMA of (xi + psi) / 2


def _scramble(net: DiffVNet) -> None:
    """Distinct values everywhere (fresh BatchNorm weights are all 1, biases and buffers 0)."""
    g = torch.Generator().manual_seed(5)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=g))
            module.running_var.copy_(1 + torch.rand(module.running_var.shape, generator=g))


def test_average_into_theta_follows_the_official_formula():
    net = diff_vnet()
    with torch.no_grad():
        _scramble(net)
    xi = copy.deepcopy(dict(net.decoder_xi.named_parameters()))
    psi = copy.deepcopy(dict(net.decoder_psi.named_parameters()))
    theta = copy.deepcopy(dict(net.decoder_theta.named_parameters()))
    theta_buffers = copy.deepcopy(dict(net.decoder_theta.named_buffers()))
    m = 0.9
    net.average_into_theta(m)
    after = dict(net.decoder_theta.named_parameters())
    assert set(after) == set(theta)
    for name, value in after.items():
        expected = m * theta[name] + (1 - m) * (xi[name] + psi[name]) / 2
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(value, theta[name]), f"{name} was not averaged"
    for name, value in net.decoder_theta.named_buffers():
        assert torch.equal(value, theta_buffers[name]), f"BatchNorm buffer {name} changed"
    # D_xi's time projections have no counterpart; D_xi and D_psi themselves are untouched.
    assert [n for n in xi if n not in theta] and all(".time." in n for n in xi if n not in theta)
    for name, value in net.decoder_xi.named_parameters():
        assert torch.equal(value, xi[name])
    for name, value in net.decoder_psi.named_parameters():
        assert torch.equal(value, psi[name])


# ---------------------------------------------------------------- label diffusion


def test_timestep_embedding_is_the_ddpm_sinusoid():
    t = torch.tensor([0, 5, 999])
    emb = timestep_embedding(t, 128)
    half = 64
    expected = np.zeros((3, 128))
    for row, step in enumerate([0, 5, 999]):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / (half - 1))
            expected[row, i] = math.sin(step * freq)
            expected[row, half + i] = math.cos(step * freq)
    assert emb.shape == (3, 128)
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4)
    np.testing.assert_array_equal(emb[0].numpy(), [0.0] * half + [1.0] * half)
    assert timestep_embedding(t, 9).shape == (3, 9) and torch.all(
        timestep_embedding(t, 9)[:, -1] == 0
    )


def _space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``guided_diffusion/respace.py`` ``space_timesteps(num_timesteps, [count])``, by hand."""
    frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return sorted(set(taken))


def test_ten_spaced_steps_are_those_of_guided_diffusion():
    assert spaced_steps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert spaced_steps(1000, 1) == [0] and spaced_steps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="count"):
        spaced_steps(10, 11)


@pytest.mark.parametrize("count", [5, 21, 23, 31, 50, 100])
def test_spaced_steps_match_respace_for_any_count(count):
    """respace accumulates the float stride; 21 steps of 1000 give 499 there, not 500."""
    assert spaced_steps(1000, count) == _space_timesteps(1000, count)


def test_linear_schedule_from_1e4_to_0_02():
    abar = LabelDiffusion().alphas_cumprod()
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    assert abar[-1].item() == pytest.approx(
        float(np.prod(1 - np.linspace(1e-4, 0.02, 1000))), rel=1e-9
    )
    assert bool(torch.all(abar[1:] < abar[:-1]))
    # get_named_beta_schedule("linear", T) scales the betas by 1000 / T
    assert LabelDiffusion(steps=500, sample_steps=5).alphas_cumprod()[0].item() == pytest.approx(
        1 - 2e-4
    )


def test_q_sample_mixes_label_and_noise_by_alpha_bar():
    diffusion = LabelDiffusion()
    x0 = label_to_x0(label(), C)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 700])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    x_t = diffusion.q_sample(x0, t, noise)
    for b, step in enumerate([0, 700]):
        expected = math.sqrt(abar[step]) * x0[b] + math.sqrt(1 - abar[step]) * noise[b]
        torch.testing.assert_close(x_t[b], expected)


def test_training_steps_are_uniform_over_all_steps():
    t = LabelDiffusion().sample_t(5000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert int(t.min()) < 10 and int(t.max()) > 990


def test_ddim_with_a_perfect_denoiser_returns_the_label_and_keeps_its_noise():
    """With x̂0 = x0 at every step, η = 0 DDIM keeps ε fixed: x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε."""
    diffusion = LabelDiffusion()
    abar = diffusion.alphas_cumprod().float()
    x0 = label_to_x0(label(), C)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def perfect(x_t, t):
        seen.append((x_t.clone(), t.clone()))
        return x0

    out = diffusion.ddim_x0(perfect, tuple(x0.shape), "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(out, x0)
    steps = [int(t[0]) for _, t in seen]
    assert steps == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert all(t.shape == (2,) and t.dtype == torch.long for _, t in seen)
    x_T = seen[0][0]
    torch.testing.assert_close(
        x_T, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    )
    eps = (x_T - abar[999].sqrt() * x0) / (1 - abar[999]).sqrt()
    for x_t, t in seen[1:]:
        a = abar[int(t[0])]
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-4, rtol=1e-4)


def test_ddim_clamps_predictions_to_the_label_range():
    diffusion = LabelDiffusion(sample_steps=3)
    seen = []

    def wild(x_t, t):
        seen.append(x_t)
        return torch.full_like(x_t, 7.0) * torch.sign(x_t)

    out = diffusion.ddim_x0(wild, (1, C, 4, 4, 4), "cpu", torch.Generator().manual_seed(0))
    assert float(out.abs().max()) == 1.0
    assert set(torch.unique(out).tolist()) <= {-1.0, 0.0, 1.0}
    # the clamped x̂0 (not 7) drives the update: x stays on the scale of √ᾱ·1 + √(1 − ᾱ)·ε
    assert float(seen[-1].abs().max()) < 7


def test_ddim_is_deterministic_under_a_seeded_generator():
    diffusion = LabelDiffusion(sample_steps=4)

    def denoiser(x_t, t):
        return torch.tanh(x_t * 3) + t.float().view(-1, 1, 1, 1, 1) / 2000

    def sample(seed):
        return diffusion.ddim_x0(
            denoiser, (2, C, 4, 4, 4), "cpu", torch.Generator().manual_seed(seed)
        )

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_label_to_x0_is_one_hot_times_two_minus_one_channels_first():
    y = label()
    x0 = label_to_x0(y, C)
    assert x0.shape == (2, C, *SHAPE) and x0.dtype == torch.float32
    for c in range(C):
        torch.testing.assert_close(x0[:, c], torch.where(y == c, 1.0, -1.0))
    assert torch.equal(x0.argmax(dim=1), y)


# ---------------------------------------------------------------- step helpers


def test_rampup_goes_from_exp_minus_five_to_one_monotonically():
    assert rampup(0, 100, 1.0) == pytest.approx(math.exp(-5))
    assert rampup(100, 100, 1.0) == 1.0 and rampup(150, 100, 1.0) == 1.0
    assert rampup(25, 100, 0.25) == 1.0 and rampup(0, 100, 0.0) == 1.0
    assert rampup(50, 100, 1.0) == pytest.approx(math.exp(-5 * 0.25))
    values = [rampup(s, 100, 1.0) for s in range(101)]
    assert np.all(np.diff(values) > 0)


def test_gaussian_smooth_uses_a_normalised_3x3x3_gaussian_per_channel():
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / 2)  # σ = 1 at offsets -1, 0, 1
    kernel = g[:, None, None] * g[None, :, None] * g[None, None, :]
    kernel /= kernel.sum()
    impulse = torch.zeros(1, 2, 7, 7, 7)
    impulse[0, 1, 3, 3, 3] = 1.0
    out = gaussian_smooth(impulse)
    assert out.shape == impulse.shape
    np.testing.assert_allclose(out[0, 1, 2:5, 2:5, 2:5].numpy(), kernel, rtol=1e-6)
    assert float(out[0, 1].sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(out[0, 0].abs().max()) == 0.0  # channels are smoothed separately


def test_gaussian_smooth_keeps_a_constant_field_inside_and_pads_with_zeros():
    field = torch.full((2, C, 6, 7, 8), 0.4)
    out = gaussian_smooth(field)
    assert out.shape == field.shape
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1, 1:-1], field[:, :, 1:-1, 1:-1, 1:-1])
    assert float(out[0, 0, 0, 0, 0]) < 0.4  # "same" padding with zeros at the border


def test_ema_update_moves_the_teacher_towards_the_student_exactly():
    torch.manual_seed(0)
    student, teacher = VNet(VNetConfig(width=W), C), VNet(VNetConfig(width=W), C)
    before = [p.detach().clone() for p in teacher.parameters()]
    buffers = [b.clone() for b in teacher.buffers()]
    ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(buffers, teacher.buffers()))


# ---------------------------------------------------------------- steps


def _batches(seed=0):
    return {"image": image(seed=seed), "label": label(seed=seed)}, {"image": image(seed=seed + 10)}


def _group_grads(net: DiffVNet) -> dict[str, float]:
    groups = {
        "encoder": net.encoder,
        "decoder_xi": net.decoder_xi,
        "decoder_psi": net.decoder_psi,
        "decoder_theta": net.decoder_theta,
    }
    return {
        k: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)
        for k, m in groups.items()
    }


def test_ad_step_returns_its_terms_and_trains_every_decoder_and_the_encoder():
    cfg = experiment("ad.diffusion_process.sample_steps=2")
    net = diff_vnet()
    labeled, unlabeled = _batches()
    out = ad_step(
        net, net, labeled, unlabeled, DifficultyWeights(C), 0, cfg, torch.Generator().manual_seed(0)
    )
    assert {"loss", "deno", "diff", "unsup", "mu"} <= set(out)
    assert {f"drs/{c}" for c in range(C)} <= set(out)
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["loss"], out["deno"] + out["diff"] + out["mu"] * out["unsup"])
    out["loss"].backward()
    grads = _group_grads(net)
    assert all(g > 0 for g in grads.values()), grads


def test_ad_step_ramps_mu_from_exp_minus_five():
    cfg = experiment("ad.diffusion_process.sample_steps=1", "ad.mu=2.0")
    net = diff_vnet()
    labeled, unlabeled = _batches()
    first = ad_step(net, net, labeled, unlabeled, None, 0, cfg)
    last = ad_step(net, net, labeled, unlabeled, None, cfg.optim.steps, cfg)
    assert float(first["mu"]) == pytest.approx(2.0 * math.exp(-5))
    assert float(last["mu"]) == pytest.approx(2.0)


def test_ad_step_without_drs_has_no_class_weights():
    cfg = experiment("ad.diffusion_process.sample_steps=1", "ad.drs=false")
    net = diff_vnet()
    out = ad_step(net, net, *_batches(), None, 0, cfg)
    assert not [k for k in out if k.startswith("drs/")]
    assert torch.isfinite(out["loss"])


def test_ad_step_averages_theta_before_the_step():
    cfg = experiment("ad.diffusion_process.sample_steps=1", "ad.ema=0.5")
    net = diff_vnet()
    expected = copy.deepcopy(net)
    expected.average_into_theta(0.5)
    ad_step(net, net, *_batches(), None, 0, cfg)
    for (name, a), b in zip(
        net.decoder_theta.named_parameters(), expected.decoder_theta.parameters()
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_pseudo_labels_come_from_passes_without_autograd(monkeypatch):
    """The DDIM passes of D_ξ and the D_ψ pass on unlabeled crops build no graph; the one
    training pass of each branch does; L_u's gradient reaches D_θ but not D_ξ or D_ψ."""
    cfg = experiment("ad.diffusion_process.sample_steps=3")
    net = diff_vnet()
    calls: dict[str, list[bool]] = {"denoise": [], "psi": []}
    for name in calls:
        real = getattr(net, name)

        def spy(*args, _real=real, _name=name):
            calls[_name].append(torch.is_grad_enabled())
            return _real(*args)

        monkeypatch.setattr(net, name, spy)
    out = ad_step(net, net, *_batches(), None, 0, cfg)
    assert sorted(calls["denoise"]) == [False, False, False, True]  # 3 DDIM steps, 1 training pass
    assert sorted(calls["psi"]) == [False, True]
    grads = torch.autograd.grad(
        out["unsup"],
        [
            *net.decoder_xi.parameters(),
            *net.decoder_psi.parameters(),
            *net.decoder_theta.parameters(),
        ],
        allow_unused=True,
    )
    n_xi = len(list(net.decoder_xi.parameters())) + len(list(net.decoder_psi.parameters()))
    assert all(g is None for g in grads[:n_xi])
    assert all(g is not None for g in grads[n_xi:])


def test_ad_step_without_diffusion_runs_the_plain_xi_decoder():
    cfg = experiment("ad.diffusion=false", "ad.rs=false")
    net = diff_vnet(diffusion=False)
    out = ad_step(net, net, *_batches(), DifficultyWeights(C), 3, cfg)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in net.parameters())


def test_mean_teacher_step_adds_a_ramped_consistency_and_leaves_the_teacher_alone():
    cfg = experiment(method="mean-teacher")
    torch.manual_seed(0)
    student, teacher = VNet(VNetConfig(width=W), C), VNet(VNetConfig(width=W), C)
    labeled, unlabeled = _batches()
    out = mean_teacher_step(
        student, teacher, labeled, unlabeled, 0, cfg, torch.Generator().manual_seed(0)
    )
    assert all(torch.isfinite(out[k]) for k in ("loss", "sup", "consistency"))
    assert float(out["weight"]) == pytest.approx(cfg.mean_teacher.consistency * math.exp(-5))
    torch.testing.assert_close(out["loss"], out["sup"] + out["weight"] * out["consistency"])
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_supervised_step_is_dice_ce_on_the_labeled_crops():
    net = VNet(VNetConfig(width=W), C)
    labeled, _ = _batches()
    out = supervised_seg_step(net, labeled)
    assert torch.isfinite(out["loss"]) and torch.equal(out["loss"], out["sup"])
    out["loss"].backward()
    assert all(p.grad is not None for p in net.parameters())


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("setting", ["ssl", "imbssl", "uda", "semidg"])
@pytest.mark.parametrize("profile", ["", "-cpu"])
def test_bundled_segmentation_configs_load(setting, profile):
    cfg = load_config(SegmentationExperiment, resolve_config(f"seg-{setting}{profile}"))
    assert cfg.setting == setting and cfg.method == "ad"
    assert all(p % 16 == 0 for p in cfg.data.patch)
    assert cfg.model.width == (8 if profile else 32)
    if setting == "uda":
        assert cfg.data.unlabeled_domains and cfg.data.tested_on == cfg.data.unlabeled_domains
        assert cfg.data.labeled_fraction == 1.0
    if setting == "semidg":
        assert not set(cfg.data.tested_on) & set(cfg.data.domains)


def test_a_patch_not_a_multiple_of_16_names_the_data_section():
    with pytest.raises(ConfigError, match="multiples of 16") as info:
        experiment("data.patch=[16,40,48]")
    assert info.value.key == "data"


def test_an_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"ad\.drss.*did you mean 'ad\.drs'") as info:
        experiment("ad.drss=false")
    assert info.value.key == "ad.drss"
    with pytest.raises(ConfigError, match=r"'ad\.diffusion_process'.*steps >= 2") as info:
        experiment("ad.diffusion_process.steps=1")
    assert info.value.key == "ad.diffusion_process"


def test_gumbel_softmax_draws_from_the_step_generator_and_samples_the_softmax():
    from medssl.training.methods.ad import _gumbel_softmax

    logits = torch.tensor([0.0, float(np.log(3.0))]).view(1, 2, 1, 1, 1).expand(20000, 2, 1, 1, 1)
    first = _gumbel_softmax(logits, torch.Generator().manual_seed(7))
    again = _gumbel_softmax(logits, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    torch.testing.assert_close(first.sum(dim=1), torch.ones(20000, 1, 1, 1))
    # Gumbel-max: the argmax of logits + Gumbel noise is a sample of softmax(logits) = (1/4, 3/4).
    assert abs(first.argmax(dim=1).float().mean().item() - 0.75) < 0.015


@pytest.mark.parametrize("diffusion", [None, True])
def test_place_puts_conv_weights_channels_last_on_the_cpu_and_computes_the_same(diffusion):
    """``place``: 5-D tensors channels-last on the CPU; logits and gradients as in the default
    layout up to summation order; checkpoints of either layout load into the other.

    Eval mode: in train mode the deepest BatchNorms of a 16^3 crop normalise 2 values per
    channel, which turns summation-order differences into large ones (both layouts alike)."""
    from medssl.training.networks.segmenter import place

    def build():
        torch.manual_seed(0)
        cfg = VNetConfig(width=W, dropout=False, stage_dropout=0.0)
        return VNet(cfg, C) if diffusion is None else DiffVNet(cfg, C, diffusion=True)

    ref, net = build().eval(), place(build(), torch.device("cpu")).eval()
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    x, y = image(), label()
    out_ref, out = ref.theta(x) if diffusion else ref(x), net.theta(x) if diffusion else net(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.nn.functional.cross_entropy(out_ref, y).backward()
    torch.nn.functional.cross_entropy(out, y).backward()
    for (name, a), b in zip(ref.named_parameters(), net.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)
    back = build().eval()
    back.load_state_dict(net.state_dict())
    torch.testing.assert_close(
        back.theta(x) if diffusion else back(x), out_ref, rtol=1e-4, atol=1e-5
    )
