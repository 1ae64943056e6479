"""Each zoo objective against an independent computation (torch.distributions, brute-force sums, closed forms)."""

import contextlib
import copy
import functools
import json
import math
import shutil
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from scipy import ndimage
from torch.distributions import Bernoulli, MultivariateNormal, Normal
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

import autoencoders
from autoencoders.callbacks import ImageLogger
from autoencoders.errors import UserError
from autoencoders.evaluation import evaluate
from autoencoders.losses import imq_mmd, kl_decomposition
from autoencoders.models import (
    AAE,
    AE,
    DAE,
    FSQVAE,
    HVAE,
    IAFVAE,
    IWAE,
    M2,
    MSSSIMVAE,
    PIWAE,
    RAE,
    VAE,
    VAEGAN,
    VQVAE,
    WAE,
    BetaTCVAE,
    CapacityVAE,
    FactorVAE,
    HamiltonianVAE,
    HypersphericalVAE,
    InfoVAE,
    NormalizingFlowVAE,
    SparseAE,
    VampVAE,
)
from autoencoders.models.adversarial import permute_dims
from autoencoders.models.classifier import Classifier
from autoencoders.models.nf import FLOWS
from autoencoders.models.svae import log_ive, vmf_kl_to_uniform, vmf_log_prob, vmf_rsample
from autoencoders.models.vq import fsq_levels
from autoencoders.pictures import picture_grids
from autoencoders.samplers import CodePrior
from autoencoders.training import check_config, train
from tests.helpers import ROOT, TINY, compose_train

SHAPE = (1, 8, 8)


def binary_images(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(0)))


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | logits) per image, from torch's own cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_a_fully_masked_dae_reconstructs_every_image_from_a_blank_one(arch):
    model = DAE(SHAPE, corruption="masking", noise=1.0, latent_dim=3, arch=arch)
    x = binary_images()
    blank = model.decoder(model.encode(torch.zeros_like(x)))
    torch.testing.assert_close(model.loss_terms(x)["loss"], bernoulli_nll(blank, x).mean())
    terms = model.loss_terms(x, "val")
    torch.testing.assert_close(terms["recon"], bernoulli_nll(model.decoder(model.encode(x)), x).mean())


def test_gaussian_corruption_feeds_a_noisy_image_and_scores_the_clean_one():
    model = DAE(SHAPE, corruption="gaussian", noise=0.5, latent_dim=3)
    x = binary_images()
    torch.manual_seed(1)
    loss = model.loss_terms(x)["loss"]
    torch.manual_seed(1)
    noisy = x + 0.5 * torch.randn(x.shape)
    torch.testing.assert_close(loss, bernoulli_nll(model.decoder(model.encode(noisy)), x).mean())


def test_the_sparse_ae_adds_the_weighted_l1_over_l2_ratio_of_its_codes():
    model = SparseAE(SHAPE, sparsity=0.25, latent_dim=4)
    x = binary_images()
    terms = model.loss_terms(x)
    z = model.encode(x).detach().double().numpy()
    ratio = np.mean([np.abs(code).sum() / np.sqrt((code**2).sum()) for code in z])
    torch.testing.assert_close(terms["recon"], bernoulli_nll(model.decoder(model.encode(x)), x).mean())
    torch.testing.assert_close(terms["loss"].item(), terms["recon"].item() + 0.25 * ratio)


def test_the_sparse_ae_penalty_cannot_be_dodged_by_shrinking_codes_into_the_decoder():
    """Codes 1000 times smaller, decoded by a first layer 1000 times larger: the same reconstruction, and (unlike an
    L1 penalty, which would fall 1000-fold) the same loss."""
    model = SparseAE(SHAPE, sparsity=1.0, latent_dim=4)
    shrunk = copy.deepcopy(model)
    with torch.no_grad():
        shrunk.encoder[-1].weight.mul_(1e-3), shrunk.encoder[-1].bias.mul_(1e-3)
        shrunk.decoder[0].weight.mul_(1e3)
    x = binary_images()
    before, after = model.loss_terms(x), shrunk.loss_terms(x)
    torch.testing.assert_close(shrunk.encode(x), 1e-3 * model.encode(x))
    torch.testing.assert_close(after["recon"], before["recon"])
    torch.testing.assert_close(after["loss"], before["loss"])


def test_the_imq_mmd_equals_the_brute_force_double_sum():
    generator = torch.Generator().manual_seed(0)
    z, p = torch.randn(7, 3, generator=generator) + 0.5, torch.randn(7, 3, generator=generator)
    scales = (0.5, 1.0, 2.0)

    def k(a, b):
        return sum(s * 6 / (s * 6 + float(((a - b) ** 2).sum())) for s in scales)

    n = len(z)
    same = sum(k(z[i], z[j]) + k(p[i], p[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(k(z[i], p[j]) for i in range(n) for j in range(n)) / n**2
    assert imq_mmd(z, p, scales).item() == pytest.approx(same - 2 * cross, rel=1e-5)


def test_the_mmd_is_near_zero_for_the_prior_and_large_for_shifted_codes():
    generator = torch.Generator().manual_seed(0)
    prior = torch.randn(400, 4, generator=generator)
    assert abs(imq_mmd(torch.randn(400, 4, generator=generator), prior).item()) < 0.02
    assert imq_mmd(torch.randn(400, 4, generator=generator) + 2, prior).item() > 0.5


def test_the_wae_loss_is_recon_plus_the_weighted_mmd_to_prior_draws():
    model = WAE(SHAPE, mmd_weight=3.0, latent_dim=2)
    x = binary_images()
    torch.manual_seed(2)
    terms = model.loss_terms(x)
    z = model.encode(x)
    torch.manual_seed(2)
    prior = torch.randn(len(x), 2)
    torch.testing.assert_close(terms["recon"], bernoulli_nll(model.decoder(z), x).mean())
    torch.testing.assert_close(terms["loss"], terms["recon"] + 3.0 * imq_mmd(z, prior))


@pytest.mark.parametrize(("k", "m", "beta"), [(4, 1, 0.0), (3, 2, 0.0), (4, 1, 0.5), (2, 3, 0.25)])  # I, MI, CIWAE
def test_the_iwae_family_trains_rainforth_et_als_bounds_from_torch_distributions(k, m, beta):
    """IWAE: log mean_k w; MIWAE: the mean over m groups of k; CIWAE: beta * mean log w + (1 - beta) * IWAE; w from
    torch.distributions, the bounds in plain Python."""
    model = IWAE(SHAPE, k=k, m=m, beta=beta, latent_dim=3)
    x = binary_images()
    torch.manual_seed(3)
    terms = model.loss_terms(x)
    torch.manual_seed(3)
    mu, logvar = model.posterior(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = mu + q.stddev * torch.randn(m * k, *mu.shape)  # (m k, B, D): the model's draws; the densities are torch's
    logits = model.decoder(z.flatten(0, 1)).view(m * k, len(x), *SHAPE)
    log_w = (
        Bernoulli(logits=logits).log_prob(x).flatten(2).sum(2) + Normal(0, 1).log_prob(z).sum(2) - q.log_prob(z).sum(2)
    ).T.tolist()  # per image, its m k log weights

    def log_mean_exp(values: list[float]) -> float:
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values) / len(values))

    per_image = [
        beta * sum(w) / len(w) + (1 - beta) * sum(log_mean_exp(w[g * k : (g + 1) * k]) for g in range(m)) / m
        for w in log_w
    ]
    bound = sum(per_image) / len(per_image)
    assert terms["iwae"].item() == pytest.approx(bound, rel=1e-5)
    torch.testing.assert_close(terms["loss"], -terms["iwae"])
    assert terms["iwae"] >= terms["elbo"] - 5  # in expectation the k-sample bound is the tighter one


@pytest.mark.parametrize(("k", "m"), [(3, 2), (2, 3)])
def test_the_piwae_trains_its_decoder_on_the_mk_sample_bound_and_its_encoder_on_the_miwae_bound(k, m):
    """Rainforth et al.'s PIWAE: after one backward of its loss, the decoder's gradient is autograd's of the m k-sample
    IWAE bound and the encoder's that of the MIWAE bound, both of one plain graph of the same draws' log weights
    from torch.distributions."""
    model = PIWAE(SHAPE, k=k, m=m, latent_dim=3)
    x = binary_images()
    torch.manual_seed(3)
    terms = model.loss_terms(x)
    terms["loss"].backward()
    torch.manual_seed(3)
    mu, logvar = model.posterior(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = mu + q.stddev * torch.randn(m * k, *mu.shape)  # (m k, B, D): the model's draws
    logits = model.decoder(z.flatten(0, 1)).view(m * k, len(x), *SHAPE)
    log_w = (
        Bernoulli(logits=logits).log_prob(x).flatten(2).sum(2) + Normal(0, 1).log_prob(z).sum(2) - q.log_prob(z).sum(2)
    )
    iwae = (torch.logsumexp(log_w, 0) - math.log(m * k)).mean()
    miwae = (torch.logsumexp(log_w.view(m, k, -1), 1) - math.log(k)).mean()
    torch.testing.assert_close(terms["iwae"], iwae)
    torch.testing.assert_close(terms["miwae"], miwae)
    torch.testing.assert_close(terms["loss"], -iwae)
    nets = {
        "decoder": (list(model.decoder.parameters()), iwae, miwae),
        "encoder": (list(model.encoder.parameters()), miwae, iwae),
    }
    for net, (params, own, other) in nets.items():
        expected = torch.autograd.grad(-own, params, retain_graph=True)
        for param, grad in zip(params, expected, strict=True):
            torch.testing.assert_close(param.grad, grad, msg=net)
        wrong = torch.autograd.grad(-other, params, retain_graph=True)  # the other bound's gradient is another
        assert any((param.grad - grad).abs().max() > 1e-4 for param, grad in zip(params, wrong, strict=True)), net


def ssim_maps(a: np.ndarray, b: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Wang et al.'s SSIM map of two grey images in [0, 1] (c1 = 0.01², c2 = 0.03²), and its contrast-structure part
    3.5 sigma clear of the border: local means, variances and covariance under scipy's Gaussian window, 3.5 sigma
    either side, the image mirrored at its border."""

    def local_mean(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=3.5)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b, cov = local_mean(a * a) - mu_a**2, local_mean(b * b) - mu_b**2, local_mean(a * b) - mu_a * mu_b
    contrast = (2 * cov + c2) / (var_a + var_b + c2)
    r = int(3.5 * sigma + 0.5)
    return (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1) * contrast, contrast[r:-r, r:-r]


def ms_ssim(a: np.ndarray, b: np.ndarray, scales: int, sigma: float) -> float:
    """MS-SSIM (Wang et al., 2003) of two grey images: the mean contrast parts of the finer scales and the mean SSIM
    of the coarsest, each scale the 2x2 means of the one before, each value v mapped to (v + 1) / 2 (pythae's), to
    Wang et al.'s exponents of those scales rescaled to sum to 1."""
    betas = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    value = 1.0
    for scale, beta in enumerate(betas / betas.sum()):
        ssim, contrast = ssim_maps(a, b, sigma)
        value *= (((contrast if scale < scales - 1 else ssim).mean() + 1) / 2) ** beta
        h, w = a.shape[0] // 2, a.shape[1] // 2
        a, b = (image[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean((1, 3)) for image in (a, b))
    return value


@pytest.mark.parametrize(("size", "scales"), [(8, 2), (28, 3)])  # 3 scales, the default, need 28x28 images and up
def test_the_msssim_vae_loss_is_the_weighted_ms_ssim_dissimilarity_plus_the_weighted_kl(size, scales):
    model = MSSSIMVAE((1, size, size), recon_weight=50.0, scales=scales, sigma=0.75, kl_weight=0.5, latent_dim=3)
    x = torch.bernoulli(torch.rand(6, 1, size, size, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(5)
    terms = model.loss_terms(x)
    torch.manual_seed(5)
    mu, logvar = model.posterior(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p_x = Bernoulli(logits=model.decoder(mu + q.stddev * torch.randn_like(mu)))
    means, images = p_x.mean.detach().double().numpy(), x.double().numpy()
    similarity = np.mean([ms_ssim(mean[0], image[0], scales, 0.75) for mean, image in zip(means, images, strict=True)])
    kl = torch.distributions.kl_divergence(q, Normal(0, 1)).sum(1).mean()
    assert terms["msssim"].item() == pytest.approx(similarity, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(50.0 * (1 - similarity) + 0.5 * kl.item(), rel=1e-5)
    torch.testing.assert_close(terms["elbo"], p_x.log_prob(x).flatten(1).sum(1).mean() - kl)  # a VAE's, in nats


def test_ms_ssim_is_one_for_identical_images_its_one_scale_is_wang_et_als_ssim_and_small_images_are_refused():
    model = MSSSIMVAE(SHAPE, scales=2, sigma=0.75, latent_dim=3)
    a, b = torch.rand(2, 4, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(1 - model.msssim(a, a), torch.zeros(4))  # a zero reconstruction term
    one_scale = multiscale_structural_similarity_index_measure(
        a, b, sigma=0.75, kernel_size=7, reduction="none", data_range=1.0, betas=(1.0,), normalize=None
    )
    pairs = zip(a.numpy(), b.numpy(), strict=True)
    ssim = [ssim_maps(image_a[0], image_b[0], 0.75)[0].mean() for image_a, image_b in pairs]
    torch.testing.assert_close(one_scale, torch.tensor(ssim, dtype=torch.float64))
    with pytest.raises(UserError, match=r"model.scales=3 scales with a 7-pixel window .* does not fit 8x8 images"):
        MSSSIMVAE(SHAPE, scales=3, sigma=0.75, latent_dim=3)


def test_the_total_correlation_estimate_matches_the_exact_tc_of_a_correlated_gaussian():
    """Codes of 3000 'images' whose posteriors N(mu_n, s^2 I) have means mu_n ~ N(0, A): the aggregate posterior is
    N(0, A + s^2 I), whose total correlation is 1/2 (sum_d log S_dd - log det S)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 1.0]])
    n, variance = 3000, 0.3
    mu = MultivariateNormal(torch.zeros(3), a).sample((n,))
    logvar = torch.full_like(mu, math.log(variance))
    z = mu + math.sqrt(variance) * torch.randn(n, 3, generator=generator)
    s = a + variance * torch.eye(3)
    exact_tc = 0.5 * (torch.log(torch.diagonal(s)).sum() - torch.logdet(s))
    parts = kl_decomposition(z, mu, logvar, dataset_size=n)  # the whole set as one batch
    assert parts["tc"].item() == pytest.approx(exact_tc.item(), abs=0.03)
    # a batch of 500 standing for the 3000: the same within the estimator's noise
    assert kl_decomposition(z[:500], mu[:500], logvar[:500], n)["tc"].item() == pytest.approx(exact_tc.item(), abs=0.1)
    exact_kl = 0.5 * (torch.trace(s) - 3 - torch.logdet(s)).item()  # KL(q(z) || N(0, I)) = tc + dim_kl
    assert (parts["tc"] + parts["dim_kl"]).item() == pytest.approx(exact_kl, abs=0.05)


def test_beta_tcvae_weights_the_total_correlation_and_keeps_the_analytic_elbo():
    model = BetaTCVAE(SHAPE, tc_weight=6.0, latent_dim=3)
    x = binary_images(16)
    torch.manual_seed(4)
    terms = model.loss_terms(x)
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["mi"] + 6 * terms["tc"] + terms["dim_kl"])
    torch.manual_seed(4)
    mu, logvar = model.posterior(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    torch.testing.assert_close(terms["recon"], bernoulli_nll(model.decoder(z), x).mean())
    kl = torch.distributions.kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0, 1)).sum(1).mean()
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + kl))


@pytest.mark.parametrize(("step", "capacity"), [(0, 0.0), (250, 5.0), (1000, 20.0), (5000, 20.0)])
def test_the_capacity_vae_pulls_the_kl_towards_a_capacity_that_rises_with_the_step(step, capacity):
    """Burgess et al.'s loss, recon + gamma |KL - C|, C = capacity min(1, step / capacity_steps), computed here with
    torch.distributions."""
    model = CapacityVAE(SHAPE, gamma=100.0, capacity=20.0, capacity_steps=1000, latent_dim=3)
    model.trainer = Mock(global_step=step)  # the step C follows (a Trainer's, saved with its checkpoints)
    x = binary_images(16)
    torch.manual_seed(4)
    terms = model.loss_terms(x)
    torch.manual_seed(4)
    mu, logvar = model.posterior(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    recon = -Bernoulli(logits=model.decoder(q.rsample())).log_prob(x).sum((1, 2, 3)).mean()
    kl = torch.distributions.kl_divergence(q, Normal(0, 1)).sum(1).mean()
    torch.testing.assert_close(terms["capacity"], torch.tensor(capacity))
    torch.testing.assert_close(terms["loss"], recon + 100.0 * (kl - capacity).abs())
    torch.testing.assert_close(terms["elbo"], -(recon + kl))


def compose_evaluate(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_the_vqvae_loss_quantizes_to_the_nearest_codebook_vectors_with_straight_through_gradients():
    model = VQVAE(SHAPE, codebook_size=5, embedding_dim=2, ema=False, latent_dim=4)
    x = binary_images()
    terms = model.loss_terms(x)
    z = model.encode(x)
    book = model.codebook.detach()

    def closest(token):
        return book[min(range(5), key=lambda k: float(((token - book[k]) ** 2).sum()))]

    nearest = torch.stack([torch.cat([closest(token) for token in row.view(2, 2)]) for row in z.detach()])
    torch.testing.assert_close(terms["recon"], bernoulli_nll(model.decoder(nearest), x).mean())
    torch.testing.assert_close(terms["commitment"], ((z - nearest) ** 2).sum(1).mean())
    torch.testing.assert_close(terms["loss"], terms["recon"] + 0.25 * terms["commitment"] + terms["codebook"])
    terms["loss"].backward()
    assert model.codebook.grad is not None and all(p.grad is not None for p in model.encoder.parameters())


def test_vqvae_perplexity_and_usage_count_the_codebook_vectors_a_batch_uses():
    model = VQVAE(SHAPE, codebook_size=4, embedding_dim=1, latent_dim=4)
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[-3.0], [-1.0], [1.0], [3.0]]))
    model.encode = lambda x: torch.tensor([[-3.0, -1.0, 1.0, 3.0]]).repeat(len(x), 1)  # every vector once per image
    terms = model.loss_terms(binary_images(2), "val")
    assert terms["perplexity"].item() == pytest.approx(4.0) and terms["usage"].item() == 1.0
    model.encode = lambda x: torch.full((len(x), 4), 2.9)
    terms = model.loss_terms(binary_images(2), "val")
    assert terms["perplexity"].item() == pytest.approx(1.0) and terms["usage"].item() == 0.25


def test_the_ema_codebook_moves_to_the_mean_of_its_tokens():
    model = VQVAE(SHAPE, codebook_size=2, embedding_dim=1, latent_dim=2, decay=0.5, codebook_init="random")
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[-1.0], [1.0]]))
    model.encode = lambda x: torch.tensor([[-2.0, 4.0]]).repeat(len(x), 1)
    for _ in range(40):
        model.loss_terms(binary_images(3))
    torch.testing.assert_close(model.codebook.detach(), torch.tensor([[-2.0], [4.0]]), atol=1e-3, rtol=0)


def test_the_first_training_batch_sets_the_codebook_to_the_k_means_of_its_tokens():
    """Tokens from three tight clusters: the codebook becomes their three means (in some order), however far away
    its random start was; a validation batch, or a step of a resumed run (global_step > 0), changes nothing."""
    model = VQVAE(SHAPE, codebook_size=3, embedding_dim=2, latent_dim=4, ema=False)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    generator = torch.Generator().manual_seed(0)
    tokens = centres.repeat_interleave(20, 0) + 0.1 * torch.randn(60, 2, generator=generator)
    model.encode = lambda x: tokens.view(30, 4)
    start = model.codebook.detach().clone()
    model.loss_terms(binary_images(30), "val")
    assert torch.equal(model.codebook.detach(), start)
    model.loss_terms(binary_images(30))
    means = tokens.view(3, 20, 2).mean(1)
    found = sorted(model.codebook.detach().tolist())
    torch.testing.assert_close(torch.tensor(found), torch.tensor(sorted(means.tolist())))


def test_a_dead_codebook_vector_is_moved_onto_a_token_and_counted():
    model = VQVAE(SHAPE, codebook_size=2, embedding_dim=1, latent_dim=2, decay=0.5, codebook_init="random", ema=False)
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[0.0], [100.0]]))  # vector 1 is never the nearest
    model.encode = lambda x: torch.tensor([[-1.0, 1.0]]).repeat(len(x), 1)
    revived = [model.loss_terms(binary_images(2))["revived"].item() for _ in range(12)]
    # its use halves every step from 1 (decay 0.5): under revive_below=0.01 after 7 steps, when it moves onto a token
    assert revived == [0.0] * 7 + [1.0] + [0.0] * 4
    assert model.codebook[1].item() in (-1.0, 1.0)
    assert model.loss_terms(binary_images(2), "val")["usage"].item() == 1.0  # both vectors in use again


def test_the_code_prior_learns_the_dependence_between_tokens_and_a_vqvae_samples_only_with_it():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.arange(4.0).view(4, 1)
    first = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), 2000, replacement=True, generator=generator)
    codes = torch.stack([first, (first + 1) % 4], 1).float()  # the second token always follows the first
    prior = CodePrior(codebook, n_tokens=2, epochs=10).fit(codes)
    draws = prior.draw(1000, torch.Generator().manual_seed(1))
    assert ((draws[:, 1] - draws[:, 0]) % 4 == 1).float().mean().item() > 0.97
    assert (draws[:, 0] == 0).float().mean().item() == pytest.approx(0.7, abs=0.05)
    restored = CodePrior(codebook, n_tokens=2).load_state_dict(prior.state_dict())
    torch.testing.assert_close(
        restored.draw(5, torch.Generator().manual_seed(2)), prior.draw(5, torch.Generator().manual_seed(2))
    )

    model = VQVAE(SHAPE, codebook_size=4, embedding_dim=1, latent_dim=2)
    with pytest.raises(UserError, match="no N\\(0, I\\) prior"):
        model.sample(4)
    fitted = model.prior_sampler().fit(model.encode(binary_images(64)))
    assert model.sample(4, sampler=fitted).shape == (4, *SHAPE)


def normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, from torch.distributions."""
    q = Normal(mu, torch.exp(0.5 * logvar))
    return torch.distributions.kl_divergence(q, Normal(0, 1)).sum(-1)


def test_the_vampprior_is_the_explicit_mixture_of_its_pseudo_inputs_posteriors():
    model = VampVAE(SHAPE, pseudo_inputs=3, latent_dim=2)
    z = torch.randn(5, 4, 2)
    mu, logvar = model.encoder(model.pseudo_inputs.clamp(0, 1)).chunk(2, dim=1)
    components = torch.distributions.Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    mixture = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.ones(3)), components)
    torch.testing.assert_close(model.prior_log_prob(z), mixture.log_prob(z))
    x = binary_images()
    torch.manual_seed(5)
    recon, kl = model.elbo_terms(x)
    torch.manual_seed(5)
    q_mu, q_logvar = model.posterior(x)
    q = Normal(q_mu, torch.exp(0.5 * q_logvar))
    draw = q_mu + q.stddev * torch.randn(1, *q_mu.shape)[0]
    torch.testing.assert_close(kl, q.log_prob(draw).sum(1) - mixture.log_prob(draw))
    torch.testing.assert_close(recon, bernoulli_nll(model.decoder(draw), x))
    samples = model.prior_sampler().draw(20000, torch.Generator().manual_seed(0))  # the mixture's moments
    torch.testing.assert_close(samples.mean(0), mu.mean(0), atol=0.05, rtol=0)


def test_the_iaf_log_determinant_is_that_of_autograds_full_jacobian():
    model = IAFVAE(SHAPE, flow_steps=3, flow_widths=[16, 16], latent_dim=3)
    context = torch.randn(3)
    z0 = torch.randn(3)
    jacobian = torch.autograd.functional.jacobian(lambda z: model.flow(z, context)[0], z0)
    _, log_det = model.flow(z0, context)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jacobian)[1])
    made = model.flow.made[0]  # one MADE: output i reads only inputs before i
    made_jacobian = torch.autograd.functional.jacobian(lambda z: made(z, context)[0], z0)
    assert torch.all(made_jacobian.triu() == 0)
    x = binary_images()
    torch.manual_seed(6)
    recon, kl = model.elbo_terms(x)
    torch.manual_seed(6)
    mu, logvar, h = model.encoder(x).chunk(3, dim=1)
    q0 = Normal(mu, torch.exp(0.5 * logvar))
    z0 = mu + q0.stddev * torch.randn(1, *mu.shape)[0]
    zt = model.flow(z0, h)[0]
    log_dets = torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(
        lambda z, c=c: model.flow(z, c)[0], z))[1] for z, c in zip(z0, h, strict=True)])  # fmt: skip
    torch.testing.assert_close(kl, q0.log_prob(z0).sum(1) - log_dets - Normal(0, 1).log_prob(zt).sum(1))
    torch.testing.assert_close(recon, bernoulli_nll(model.decoder(zt), x))


def test_the_hierarchical_bound_is_the_two_layer_log_ratio_from_torch_distributions():
    model = HVAE(SHAPE, top_latent_dim=2, hidden=8, latent_dim=3)
    x = binary_images()
    torch.manual_seed(7)
    z1, log_ratio = model.latent_draws(x, 4)
    torch.manual_seed(7)
    mu, logvar = model.encoder(x).chunk(2, dim=1)
    q2 = Normal(*(lambda m, lv: (m, torch.exp(0.5 * lv)))(*model.bottom_up(torch.cat([mu, logvar], 1)).chunk(2, 1)))
    z2 = q2.loc + q2.scale * torch.randn(4, *q2.loc.shape)
    p_mu, p_logvar = model.prior_net(z2).chunk(2, -1)
    p1 = Normal(p_mu, torch.exp(0.5 * p_logvar))
    # q(z1|x,z2) is proportional to N(mu, var) * p(z1|z2): log q1 = log N(z1; mu, var) + log p1(z1) - log of their
    # overlap, the normaliser, which is the density N(mu; p_mu, var + p_var)
    bottom = Normal(mu, torch.exp(0.5 * logvar))
    overlap = Normal(p_mu, torch.sqrt(logvar.exp() + p_logvar.exp())).log_prob(mu)
    log_q1 = bottom.log_prob(z1) + p1.log_prob(z1) - overlap
    expected = q2.log_prob(z2).sum(-1) + log_q1.sum(-1) - Normal(0, 1).log_prob(z2).sum(-1) - p1.log_prob(z1).sum(-1)
    torch.testing.assert_close(log_ratio, expected)
    assert torch.all(model.log_likelihood(x, k=200) >= torch.stack([model.elbo(x) for _ in range(100)]).mean(0))
    draws = model.prior_sampler().draw(3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, model.prior_sampler().draw(3, torch.Generator().manual_seed(0)))


def test_the_info_vae_loss_weights_the_kl_and_the_mmd_to_prior_draws():
    model = InfoVAE(SHAPE, alpha=0.5, mmd_weight=3.0, latent_dim=2)
    x = binary_images()
    torch.manual_seed(8)
    terms = model.loss_terms(x)
    torch.manual_seed(8)
    mu, logvar = model.posterior(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    prior = torch.randn_like(z)
    kl = normal_kl(mu, logvar).mean()
    recon = bernoulli_nll(model.decoder(z), x).mean()
    torch.testing.assert_close(terms["loss"], recon + 0.5 * kl + 2.5 * imq_mmd(z, prior))
    torch.testing.assert_close(terms["elbo"], -(recon + kl))
    with pytest.raises(UserError, match="model.alpha=0.5 and model.mmd_weight=0.25 give the MMD a negative weight"):
        InfoVAE(SHAPE, alpha=0.5, mmd_weight=0.25)


def test_the_rae_loss_adds_the_code_and_decoder_weight_penalties():
    model = RAE(SHAPE, embedding_weight=0.5, decoder_weight=0.01, latent_dim=2)
    x = binary_images()
    terms = model.loss_terms(x)
    z = model.encode(x)
    linear = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(float((m.weight.detach() ** 2).sum()) for m in linear)
    recon = bernoulli_nll(model.decoder(z), x).mean()
    expected = recon + 0.5 * 0.5 * (z**2).sum(1).mean() + 0.01 * weights
    torch.testing.assert_close(terms["loss"], expected)
    with pytest.raises(UserError, match="no N\\(0, I\\) prior"):
        model.sample(2)
    fitted = model.prior_sampler().fit(torch.randn(50, 2))
    assert model.sample(3, sampler=fitted).shape == (3, *SHAPE)


@pytest.mark.parametrize("held_out", [None, torch.no_grad, torch.inference_mode])  # training; evaluate.py; Lightning's
def test_the_rae_gp_penalises_the_decoders_gradient_at_the_codes_as_the_authors_code_does(held_out):
    """RAE-GP: recon + beta |z|^2 / 2 + lambda mean_(b,d) (d/dz_bd sum_pixels decode(z_b)^2)^2, the gradient here from
    each image's full Jacobian (torch.autograd.functional.jacobian); the same in training and on held-out batches."""
    model = RAE(SHAPE, embedding_weight=0.5, decoder_weight=0.1, decoder_penalty="gradient", latent_dim=2)
    x = binary_images()
    with held_out() if held_out else contextlib.nullcontext():
        terms = {name: value.clone() for name, value in model.loss_terms(x).items()}
    z = model.encode(x).detach()
    slopes = []
    for code in z:
        image = model.decode(code[None]).flatten()
        jacobian = torch.autograd.functional.jacobian(lambda c: model.decode(c[None]).flatten(), code)  # (pixels, D)
        slopes.append(2 * jacobian.T @ image.detach())
    gradient = torch.stack(slopes).pow(2).mean()
    recon = bernoulli_nll(model.decoder(z), x).mean()
    torch.testing.assert_close(terms["decoder_gradient"].detach(), gradient.detach())
    expected = recon + 0.5 * 0.5 * (z**2).sum(1).mean() + 0.1 * gradient
    torch.testing.assert_close(terms["loss"].detach(), expected.detach())
    if not held_out:  # the penalty trains the decoder and the encoder (through z)
        terms["decoder_gradient"].backward()
        trained = [*model.decoder.parameters(), *model.encoder.parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("flow", ["planar", "radial"])
@pytest.mark.parametrize("push", [0.0, 5.0, -10.0])  # -10: w.u and beta pushed far below what keeps f invertible
def test_each_flows_log_det_is_the_log_det_of_its_jacobian(flow, push):
    torch.manual_seed(0)
    step = FLOWS[flow](3)
    with torch.no_grad():
        for name, parameter in step.named_parameters():
            if push < 0 and name in ("u", "beta_raw"):  # u against w; beta_raw so that beta is about -alpha
                parameter.copy_(push * (step.w if name == "u" else 1.0))
            else:
                parameter.add_(abs(push) * torch.randn_like(parameter))
    z = torch.randn(5, 3)
    if flow == "radial":
        z[0] = step.z0.detach() + 1e-3  # close to the centre, where a contraction would fold space
    out, log_det = step(z)
    for code, found in zip(z, log_det, strict=True):
        jacobian = torch.autograd.functional.jacobian(lambda c: step(c[None])[0][0], code)
        sign, expected = torch.linalg.slogdet(jacobian)
        assert sign > 0 and torch.isfinite(found)  # invertible, orientation kept
        torch.testing.assert_close(found, expected, atol=1e-3, rtol=1e-4)


def test_the_flow_vae_bounds_log_q_with_the_flows_log_det():
    """log q(z_K|x) = log N(z_0; mu, sigma^2) - sum log|det|, here through the flows' Jacobians one by one."""
    model = NormalizingFlowVAE(SHAPE, flows=["planar", "radial", "planar"], latent_dim=3)
    x = binary_images(4)
    torch.manual_seed(2)
    z, log_q_over_p = model.latent_draws(x, 1)
    torch.manual_seed(2)
    mu, logvar = model.posterior(x)
    q0 = Normal(mu, torch.exp(0.5 * logvar))
    z0 = q0.sample()[None]
    expected, code = q0.log_prob(z0[0]).sum(1), z0[0]
    for flow in model.flows:
        jacobians = [torch.autograd.functional.jacobian(lambda c, f=flow: f(c[None])[0][0], c) for c in code]
        expected = expected - torch.stack([torch.linalg.slogdet(j)[1] for j in jacobians])
        code = flow(code)[0]
    torch.testing.assert_close(z[0], code)
    expected = expected - Normal(0, 1).log_prob(code).sum(1)
    torch.testing.assert_close(log_q_over_p[0], expected, atol=1e-4, rtol=1e-4)


# The hyperspherical VAE's vMF posterior against scipy's Bessel functions and vonmises_fisher, and quadrature ---------
def mean_resultant_length(d: int, kappa: float) -> float:
    """A_d(kappa) = E[mu.z] = I_(d/2)(kappa) / I_(d/2-1)(kappa), from scipy's scaled Bessel functions."""
    from scipy.special import ive

    return ive(d / 2, kappa) / ive(d / 2 - 1, kappa)


@pytest.mark.parametrize("order", [0.0, 0.5, 1.0, 7.0, 31.5, 49.5, 300.0])
def test_the_log_bessel_function_and_its_slope_are_scipys(order):
    from scipy.special import ive

    kappa = np.concatenate([np.logspace(-3, 5, 81), np.linspace(30, 70, 81)])  # the series hands over near 50
    kappa = kappa[ive(order, kappa) > 1e-290]  # where scipy's does not underflow
    k = torch.tensor(kappa, requires_grad=True)
    found = log_ive(order, k)
    torch.testing.assert_close(found, torch.from_numpy(np.log(ive(order, kappa))), rtol=1e-9, atol=2e-9)
    (slope,) = torch.autograd.grad(found.sum(), k)  # d/dk log(I_v(k) e^-k) = I_(v+1)(k) / I_v(k) + v / k - 1
    expected = ive(order + 1, kappa) / ive(order, kappa) + order / kappa - 1
    torch.testing.assert_close(slope, torch.from_numpy(expected), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("d", "kappa"), [(2, 1.0), (3, 0.5), (3, 5.0), (3, 3000.0), (10, 20.0), (64, 1000.0)])
def test_vmf_draws_are_unit_vectors_whose_mean_is_the_mean_resultant_length_along_mu(d, kappa):
    torch.manual_seed(0)
    mu = F.normalize(torch.cat([torch.eye(d)[:1], -torch.eye(d)[:1], torch.randn(2, d)]).double(), dim=-1)
    n = 10_000
    z = vmf_rsample(mu, torch.full((4, 1), kappa, dtype=torch.float64), n)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(n, 4, dtype=torch.float64))
    w = (z * mu).sum(-1)
    error = (w.mean(0) - mean_resultant_length(d, kappa)) / (w.std(0) / math.sqrt(n))
    assert (error.abs() < 4).all(), error
    across = z - w.unsqueeze(-1) * mu  # the part orthogonal to mu: mean 0
    assert (across.mean(0).abs() <= 4 * across.std(0) / math.sqrt(n)).all()


@pytest.mark.parametrize("kappa", [0.5, 5.0, 3000.0])
def test_on_s2_the_draws_component_along_mu_has_the_vmfs_closed_form_distribution(kappa):
    """On S^2, P(mu.z <= w) = (e^(kappa (w - 1)) - e^(-2 kappa)) / (1 - e^(-2 kappa))."""
    from scipy.stats import kstest

    torch.manual_seed(1)
    mu = F.normalize(torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64), dim=-1)
    w = (vmf_rsample(mu, torch.tensor([[kappa]], dtype=torch.float64), 5000) * mu).sum(-1).flatten().numpy()
    assert kstest(w, lambda w: (np.exp(kappa * (w - 1)) - np.exp(-2 * kappa)) / -np.expm1(-2 * kappa)).pvalue > 1e-3


def vmf_kl_by_quadrature(d: int, kappa: float) -> float:
    """KL(vMF || uniform) on S^(d-1) as that of w = mu.z (the rest of z is uniform given w under both), by adaptive
    quadrature: under the vMF w has density e^(kappa (w - 1)) (1 - w^2)^a / Z_q, under the uniform (1 - w^2)^a / Z_u,
    a = (d - 3) / 2, so KL = E_q[kappa (w - 1)] - log Z_q + log Z_u, Z_u = B(1/2, a + 1). Integrated over t = kappa
    (1 - w), whose integrand e^-t (t (2 - t / kappa))^a / kappa^(a+1) is scaled by its peak."""
    from scipy.integrate import quad
    from scipy.special import betaln

    a = (d - 3) / 2
    peak = kappa + a - math.hypot(a, kappa)  # the integrand's mode in t, inside (0, kappa] where a > 0

    def log_f(t):
        return -t + a * np.log(t * (2 - t / kappa))

    scale = log_f(peak) if a > 0 else 0.0

    def integral(g):
        def f(t):
            return g(t) * np.exp(log_f(t) - scale)

        return quad(f, 0, 2 * kappa, points=[peak] if a > 0 else None, limit=200, epsabs=0, epsrel=1e-12)[0]

    z = integral(lambda t: 1.0)
    log_z_q = math.log(z) + scale - (a + 1) * math.log(kappa)
    return -integral(lambda t: t) / z - log_z_q + betaln(0.5, a + 1)


@pytest.mark.parametrize(
    ("d", "kappa"), [(2, 0.3), (3, 2.0), (5, 0.05), (16, 40.0), (16, 60.0), (3, 5e3), (100, 800.0)]
)
def test_the_vmf_kl_to_the_uniform_prior_and_its_slope_match_quadrature(d, kappa):
    k = torch.tensor([[kappa]], dtype=torch.float64, requires_grad=True)
    found = vmf_kl_to_uniform(k, d)
    assert found.item() == pytest.approx(vmf_kl_by_quadrature(d, kappa), rel=1e-8, abs=1e-10)
    (slope,) = torch.autograd.grad(found.sum(), k)
    h = 1e-3 * kappa
    expected = (vmf_kl_by_quadrature(d, kappa + h) - vmf_kl_by_quadrature(d, kappa - h)) / (2 * h)
    assert slope.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
def test_the_vmf_log_density_is_scipys_and_integrates_to_one_on_s2(kappa):
    from scipy.stats import vonmises_fisher

    mu = F.normalize(torch.tensor([[0.3, -0.5, 0.8]], dtype=torch.float64), dim=-1)
    cos, weights = np.polynomial.legendre.leggauss(200)  # Gauss-Legendre in cos(theta), a uniform grid in phi
    phi = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    c, p = np.meshgrid(cos, phi, indexing="ij")
    s = np.sqrt(1 - c**2)
    z = torch.from_numpy(np.stack([s * np.cos(p), s * np.sin(p), c], -1).reshape(-1, 3))
    log_q = vmf_log_prob(z, mu, torch.tensor([[kappa]], dtype=torch.float64))
    integral = (log_q.exp().view(200, 400).numpy() * weights[:, None]).sum() * 2 * np.pi / 400
    assert integral == pytest.approx(1, abs=1e-9)
    expected = vonmises_fisher(mu[0].numpy(), kappa).logpdf(z.numpy())
    torch.testing.assert_close(log_q, torch.from_numpy(expected), rtol=1e-9, atol=1e-8)


def kappa_slopes(d: int, kappa: float, n: int) -> torch.Tensor:
    """d(mu.z)/dkappa of n reparameterised draws z ~ vMF(mu, kappa), one each."""
    torch.manual_seed(2)
    mu = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=-1).expand(n, d)
    k = torch.full((n, 1), kappa, dtype=torch.float64, requires_grad=True)
    w = (vmf_rsample(mu, k, 1)[0] * mu).sum(-1)
    return torch.autograd.grad(w.sum(), k)[0].flatten()


def mean_resultant_slope(d: int, kappa: float) -> float:
    """dA_d/dkappa by central differences of scipy's A_d."""
    h = 1e-4 * kappa
    return (mean_resultant_length(d, kappa + h) - mean_resultant_length(d, kappa - h)) / (2 * h)


@pytest.mark.parametrize(("d", "kappa"), [(3, 1000.0), (16, 2000.0), (64, 5000.0)])
def test_the_reparameterised_gradient_of_the_mean_resultant_length_is_its_slope_at_large_kappa(d, kappa):
    slopes = kappa_slopes(d, kappa, 20_000)
    error = (slopes.mean() - mean_resultant_slope(d, kappa)) / (slopes.std() / math.sqrt(len(slopes)))
    assert abs(error) < 4


def test_without_g_cor_kappas_gradient_is_biased_low_where_kappa_is_small():
    """What dropping g_cor costs (HypersphericalVAE's docstring): on S^2 at kappa 3, E[dw/dkappa] is 0.7 of
    dA_d/dkappa, well outside the Monte-Carlo error."""
    slopes, exact = kappa_slopes(3, 3.0, 20_000), mean_resultant_slope(3, 3.0)
    share, error = slopes.mean() / exact, slopes.std() / math.sqrt(len(slopes)) / exact
    assert 0.65 < share < 0.75 and share + 4 * error < 1


def test_the_svae_weights_its_draws_by_scipys_vmf_density_over_the_uniform_prior_and_draws_that_prior():
    from scipy.stats import kstest, vonmises_fisher

    torch.manual_seed(3)
    model = HypersphericalVAE(SHAPE, latent_dim=3).double()
    x = binary_images(4).double()
    z, log_q_over_p = model.latent_draws(x, 6)
    mu, kappa = model.vmf(x)
    for i in range(len(x)):
        log_q = vonmises_fisher(mu[i].detach().numpy(), kappa[i].item()).logpdf(z[:, i].detach().numpy())
        torch.testing.assert_close(log_q_over_p[:, i], torch.from_numpy(log_q + np.log(4 * np.pi)))
    prior = model.prior_sampler().draw(5000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(prior.norm(dim=1), torch.ones(5000, dtype=torch.float64))
    assert kstest(prior[:, 2].numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3  # a uniform point's height on S^2


@pytest.mark.parametrize("levels", [5, 4])
def test_fsq_rounds_each_bounded_code_number_to_the_nearest_of_its_levels(levels):
    model = FSQVAE(SHAPE, levels=levels, latent_dim=3)
    model.encoder = torch.nn.Identity()  # encode() bounds the encoder's outputs, here z
    z = torch.linspace(-6, 6, 300).view(-1, 3).requires_grad_()
    codes = model.quantize(model.encode(z))
    grid = fsq_levels(levels)
    half = (levels - 1) * (1 + 1e-3) / 2
    offset = 0.5 if levels % 2 == 0 else 0.0
    shifted = z.detach() + np.arctanh(offset / half)
    bounded = (torch.tanh(shifted) * half - offset) / (levels // 2)
    nearest = grid[(bounded.unsqueeze(-1) - grid).abs().argmin(-1)]
    torch.testing.assert_close(codes.detach(), nearest)
    assert len(torch.unique(codes)) == levels  # every level is reached over the range
    codes.sum().backward()  # straight through: the gradient of the bounding alone
    torch.testing.assert_close(z.grad, (1 - torch.tanh(shifted) ** 2) * half / (levels // 2))


def test_fsq_trains_its_decoder_alone_for_its_warm_up_steps_then_its_encoder_too(tmp_path):
    import lightning as L

    x = binary_images(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16)), batch_size=8)
    for steps, encoder_learns in ((2, False), (3, True)):
        torch.manual_seed(0)
        model = FSQVAE(SHAPE, levels=5, latent_dim=3, decoder_warmup_steps=2)
        before = copy.deepcopy(model)
        trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, accelerator="cpu", limit_val_batches=0,
                            default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(model, loader)
        changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True)]
        names = [name.split(".")[0] for name, _ in model.named_parameters()]
        assert any(c for c, n in zip(changed, names, strict=True) if n == "decoder")
        assert any(c for c, n in zip(changed, names, strict=True) if n == "encoder") == encoder_learns


def test_the_aae_and_factor_vae_losses_are_their_binary_cross_entropies():
    aae = AAE(SHAPE, adversarial_weight=2.0, latent_dim=2)
    x = binary_images()
    torch.manual_seed(9)
    terms = aae.loss_terms(x)
    torch.manual_seed(9)
    z = aae.encode(x)
    d_fake, d_real = torch.sigmoid(aae.discriminator(z)), torch.sigmoid(aae.discriminator(torch.randn_like(z)))
    torch.testing.assert_close(terms["adversarial"], -torch.log(d_fake).mean())
    torch.testing.assert_close(terms["discriminator"], -torch.log(d_real).mean() - torch.log(1 - d_fake).mean())
    recon = bernoulli_nll(aae.decoder(z), x).mean()
    torch.testing.assert_close(terms["loss"], recon + 2.0 * terms["adversarial"])

    factor = FactorVAE(SHAPE, tc_weight=3.0, latent_dim=2)
    torch.manual_seed(10)
    terms = factor.loss_terms(x)
    torch.manual_seed(10)
    mu, logvar = factor.posterior(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    p_joint = torch.sigmoid(factor.discriminator(z))
    recon = bernoulli_nll(factor.decoder(z), x).mean()
    tc = torch.log(p_joint / (1 - p_joint)).mean()
    torch.testing.assert_close(terms["loss"], recon + normal_kl(mu, logvar).mean() + 3.0 * tc, rtol=1e-5, atol=1e-4)


def larsen_et_al_terms(model: VAEGAN, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """VAE-GAN's losses on the draws `loss_terms` makes after torch.manual_seed(seed), each image through the nets on
    its own: L_prior by torch.distributions' KL, L_llike by its Normal, L_GAN's three terms by explicit log-sigmoids."""
    torch.manual_seed(seed)
    mu, logvar = model.posterior(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = q.rsample()
    x_tilde, x_p = torch.sigmoid(model.decoder(z)), torch.sigmoid(model.decoder(torch.randn_like(z)))
    (dis_l_x, real), (dis_l_tilde, tilde), (_, prior) = (model.discriminator(i) for i in (x, x_tilde, x_p))
    fakes = F.logsigmoid(-tilde).mean() + F.logsigmoid(-prior).mean()  # log(1 - Dis(x~)) + log(1 - Dis(x_p))
    return {"z": z, "kl": torch.distributions.kl_divergence(q, Normal(0, 1)).sum(1).mean(),
            "llike": -Normal(dis_l_tilde, 1).log_prob(dis_l_x).sum(1).mean(),
            "fakes": fakes, "gan": F.logsigmoid(real).mean() + fakes}  # fmt: skip


def test_the_vae_gans_losses_are_larsen_et_als_from_torch_distributions():
    model, x = VAEGAN(SHAPE, gamma=0.3, latent_dim=2), binary_images()
    torch.manual_seed(11)
    terms = model.loss_terms(x)
    expected = larsen_et_al_terms(model, x, 11)
    torch.testing.assert_close(terms["kl"], expected["kl"])
    torch.testing.assert_close(terms["llike"], expected["llike"])
    torch.testing.assert_close(terms["discriminator"], -expected["gan"])
    torch.testing.assert_close(terms["loss"], expected["kl"] + 0.3 * expected["llike"] + expected["fakes"])
    recon = bernoulli_nll(model.decoder(expected["z"]), x).mean()  # the pixel likelihood, trained on or not
    torch.testing.assert_close(terms["recon"], recon)
    torch.testing.assert_close(terms["elbo"], -(recon + expected["kl"]))
    dis_l = model.discriminator(x)[0]  # at unit scale, each image's own
    torch.testing.assert_close(dis_l.mean(1), torch.zeros(len(x)), atol=1e-5, rtol=0)
    torch.testing.assert_close(dis_l.var(1, correction=0), torch.ones(len(x)), atol=1e-2, rtol=0)  # layer norm's eps


def test_each_vae_gan_optimizer_steps_on_the_gradient_of_its_own_parts_objective():
    """Through one training step, each part's gradient when its optimizer steps is autograd's of that part's objective
    alone: the encoder's of L_prior + L_llike (none of L_GAN's), the decoder's of gamma L_llike + L_GAN, the
    discriminator's of -L_GAN (none of what the autoencoder's backward pass left on its weights)."""
    model, x = VAEGAN(SHAPE, gamma=0.3, latent_dim=2), binary_images()
    parts = {"encoder": model.encoder, "decoder": model.decoder, "discriminator": model.discriminator}
    at_step: dict[str, list[torch.Tensor]] = {}

    class Recorder:  # an optimizer that keeps its parts' gradients when it steps
        def __init__(self, *names: str):
            self.names, self.optimizer = names, self

        def zero_grad(self):
            for name in self.names:
                parts[name].zero_grad()

        def step(self):
            at_step.update({name: [p.grad.clone() for p in parts[name].parameters()] for name in self.names})

    model.optimizers = lambda: (Recorder("encoder", "decoder"), Recorder("discriminator"))
    model.manual_backward = lambda loss: loss.backward()
    model.trainer = Mock(log_every_n_steps=0, lr_scheduler_configs=[], global_step=0)
    torch.manual_seed(12)
    model.training_step((x, torch.zeros(len(x))), 0)
    terms = larsen_et_al_terms(model, x, 12)
    kl, llike, gan = terms["kl"], terms["llike"], terms["gan"]
    for name, objective in {"encoder": kl + llike, "decoder": 0.3 * llike + gan, "discriminator": -gan}.items():
        expected = torch.autograd.grad(objective, list(parts[name].parameters()), retain_graph=True)
        for found, grad in zip(at_step[name], expected, strict=True):
            torch.testing.assert_close(found, grad, rtol=1e-4, atol=1e-6)
    # the routing has something to keep out: L_GAN would move the encoder, the autoencoder's loss Dis
    for objective, part in [(gan, model.encoder), (0.3 * llike + terms["fakes"], model.discriminator)]:
        grads = torch.autograd.grad(objective, list(part.parameters()), retain_graph=True)
        assert any(g.abs().sum() > 0 for g in grads)


def test_the_factor_vae_discriminator_learns_the_total_correlation_of_a_correlated_gaussian():
    """Trained on its own loss, D's mean logit on joint draws estimates the TC, here -1/2 log det(correlation)."""
    torch.manual_seed(0)
    model = FactorVAE(SHAPE, latent_dim=2, discriminator_width=64)
    scale = torch.linalg.cholesky(torch.tensor([[1.0, 0.9], [0.9, 1.0]]))
    exact_tc = -0.5 * math.log(1 - 0.9**2)
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    for _ in range(600):
        z = torch.randn(256, 2) @ scale.T
        joint, product = model.discriminator(z), model.discriminator(permute_dims(z))
        loss = F.binary_cross_entropy_with_logits(joint, torch.ones_like(joint)) + (
            F.binary_cross_entropy_with_logits(product, torch.zeros_like(product))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimate = model.discriminator(torch.randn(20000, 2) @ scale.T).mean().item()
    assert estimate == pytest.approx(exact_tc, rel=0.15)
    z = torch.randn(1000, 2)
    permuted = permute_dims(z)  # each column a permutation of its own values
    assert torch.equal(permuted.sort(0).values, z.sort(0).values) and not torch.equal(permuted, z)


@pytest.mark.parametrize("model_class", [AAE, VAEGAN])
def test_adversarial_models_step_both_optimizers_and_count_only_the_autoencoders_steps(model_class, tmp_path):
    import lightning as L

    x = binary_images(32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32)), batch_size=8)
    model = model_class(SHAPE, latent_dim=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(model, loader)
    assert trainer.global_step == 8  # 4 batches a epoch, one autoencoder step each
    moved = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"encoder", "decoder", "discriminator"}
    states = trainer.strategy.optimizer_state(trainer.optimizers[1])["state"]
    assert all(s["step"] == 8 for s in states.values())  # the discriminator's Adam stepped once per batch


# Every zoo model through train.py's and evaluate.py's code, and as a classifier's encoder ----------------------------
ZOO = {"dae": DAE, "sparse_ae": SparseAE, "wae": WAE, "iwae": IWAE, "beta_tcvae": BetaTCVAE, "vqvae": VQVAE}
ZOO |= {"vamp": VampVAE, "vae_iaf": IAFVAE, "hvae": HVAE, "factor_vae": FactorVAE, "aae": AAE, "info_vae": InfoVAE}
ZOO |= {"rae": RAE, "rae_gp": RAE, "fsq": FSQVAE, "beta_vae_c": CapacityVAE, "vae_nf": NormalizingFlowVAE}
ZOO |= {"miwae": IWAE, "ciwae": IWAE}
ZOO |= {"vae_gan": VAEGAN}
ZOO |= {"piwae": PIWAE, "msssim_vae": MSSSIMVAE}
ZOO |= {"hamiltonian_vae": HamiltonianVAE}
ZOO |= {"svae": HypersphericalVAE}


def zoo_config(name: str) -> list[str]:
    own = ["model.embedding_dim=1"] if name == "vqvae" else []  # 2 tokens of 1 number
    quiet = ["~callbacks.images", "~logger"]  # pictures and loggers are tested elsewhere; evaluate.py draws the prior
    return [*TINY, f"model={name}", "latent_dim=2", "model.arch=conv", *own, *quiet]


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    for name in ZOO:
        train(compose_train(root / name, *zoo_config(name)))
    return {name: root / name for name in ZOO}


@pytest.mark.parametrize("name", ZOO)
def test_each_zoo_model_resumes_from_its_last_checkpoint(zoo_runs, name, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zoo_runs[name], run)
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    train(compose_train(run, *zoo_config(name), "trainer.max_epochs=2", "ckpt_path=last"))
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (before["epoch"], after["epoch"]) == (0, 1) and after["global_step"] == 2 * before["global_step"]


@pytest.mark.parametrize("name", ZOO)
def test_each_zoo_model_trains_tests_and_loads_from_its_checkpoint(zoo_runs, name):
    metrics = json.loads((zoo_runs[name] / "metrics.json").read_text())
    assert {"val/recon", "test/recon"} <= set(metrics) and math.isfinite(metrics["test/recon"])
    if issubclass(ZOO[name], VAE):
        assert {"val/elbo", "test/nll", "test/bpd"} <= set(metrics)
    model = autoencoders.load(zoo_runs[name] / "checkpoints" / "last.ckpt")
    assert type(model) is ZOO[name] and model.hparams.arch == "conv"
    x = torch.rand(2, 1, 28, 28)  # the Python API runs without autograd: float() of its outputs warns of nothing
    outputs = [model.encode(x), model.decode(model.encode(x)), model.reconstruct(x), model.reconstruction_nll(x)]
    outputs += [model.elbo(x)] if isinstance(model, VAE) else []
    assert not any(output.requires_grad for output in outputs)


@pytest.mark.parametrize("name", ZOO)
def test_each_zoo_model_is_scored_by_evaluate_py(zoo_runs, name, tmp_path):
    ckpt = zoo_runs[name] / "checkpoints" / "last.ckpt"  # a lone checkpoint: the in-process run saved no .hydra/
    cfg = compose_evaluate(f"ckpt_path={ckpt}", "data=mnist_subset", "split=val", "num_samples=0",
                           f"cache_dir={tmp_path}", "k=10", "images.num_samples=4", "samplers=[prior]")  # fmt: skip
    (metrics,) = evaluate(cfg)
    assert math.isfinite(metrics["val/recon"]) and ("val/nll" in metrics) == issubclass(ZOO[name], VAE)


@pytest.mark.parametrize("name", ZOO)
def test_each_zoo_models_encoder_serves_a_classifier_with_its_own_code(zoo_runs, name):
    ckpt = zoo_runs[name] / "checkpoints" / "last.ckpt"
    classifier, model = Classifier((1, 28, 28), 10, encoder_ckpt=ckpt), autoencoders.load(ckpt)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():  # the encoder net's code: a VAE's posterior mean (before any flow or top-down pass)
        features = model.posterior(x)[0] if isinstance(model, VAE) else model.encoder(x)
        torch.testing.assert_close(classifier.encoder(x), features)


# Every picture of every model at latent sizes 1 and 2 (2 adds the manifold and the scatter), as the end of a run and
# evaluate.py draw them; untrained models have the shapes that break ---------------------------------------------------
PICTURED = {"ae": AE, "vae": VAE, **ZOO, "m2": M2, "m1m2": M2}


def untrained(name: str, latent_dim: int) -> AE:
    m2 = {"num_classes": 3}
    own = {"vqvae": {"embedding_dim": 1}, "m2": m2}
    own["msssim_vae"] = {"scales": 2}  # its default 3 scales need 28x28 images
    own["m1m2"] = m2 | {"m1": {"class": "VAE", "hparams": {"image_shape": SHAPE, "latent_dim": 3}}}
    torch.manual_seed(0)
    return PICTURED[name](SHAPE, latent_dim=latent_dim, **own.get(name, {})).eval()


@pytest.mark.parametrize("latent_dim", [1, 2])
@pytest.mark.parametrize("name", PICTURED)
def test_every_picture_is_drawn_for_each_model_at_latent_sizes_1_and_2(name, latent_dim, tmp_path):
    model, images = untrained(name, latent_dim), binary_images(16)  # 16: an RAE's prior fits 10 Gaussians to them
    data = Mock(**{"inputs.return_value": images, "val_set.labels": torch.arange(16) % 3})
    trainer = Mock(datamodule=data, is_global_zero=True, global_step=0, loggers=[])
    run_end = ImageLogger(tmp_path, num_images=2, num_samples=4, num_pairs=2, steps=3)
    run_end.on_fit_start(trainer, model)
    run_end.on_fit_end(trainer, model)
    gaussian = isinstance(model, VAE) and not isinstance(model, HypersphericalVAE)  # a vMF's KL has no per-dim split
    optional = {"samples": run_end.has_prior, "kl_per_dim": gaussian}
    optional |= {"manifold": latent_dim == 2, "scatter": latent_dim == 2}
    expected = {"reconstructions", "interpolations", "traversal"} | {p for p, drawn in optional.items() if drawn}
    assert {p.stem for p in tmp_path.glob("*.png")} == expected

    prior = model.prior_sampler()
    prior = prior.fit(model.encode(images)) if prior.needs_fit else prior
    samplers = {"prior": functools.partial(model.sample, sampler=prior)}
    grids = picture_grids(model, images.byte() * 255, samplers, 0, num_images=2, num_samples=4, num_pairs=2, steps=3)
    assert set(grids) == {"reconstructions", "samples_prior", "interpolations", "traversal"}
    assert all(grid.isfinite().all() for grid in grids.values())


def test_the_readmes_new_model_example_trains_and_loads_back(tmp_path, monkeypatch):
    """The README's "A new model" class and config, as a module of the user's own."""
    import re
    import sys
    import types

    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    readme = (ROOT / "docs" / "design.md").read_text()  # the docs' "Where to add a model"
    section = readme[readme.index("**A new model**") :]
    code, config = re.findall(r"```(?:python|yaml)\n(.*?)```", section, re.DOTALL)[:2]
    module = types.ModuleType("my_models")
    exec("from autoencoders.models import AE\n" + code, module.__dict__)
    monkeypatch.setitem(sys.modules, "my_models", module)
    cfg = OmegaConf.create(config.replace("autoencoders.models.", "my_models."))
    cfg.latent_dim = 2
    model = instantiate(cfg, image_shape=SHAPE, likelihood="bernoulli", _convert_="all")  # as train.py builds it
    x = binary_images(32)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = autoencoders.load(tmp_path / "model.ckpt")
    assert type(loaded).__name__ == "ContractiveAE" and loaded.hparams.penalty == 0.1
    assert set(model.loss_terms(x)) == {"loss", "recon", "l2"}


# The Hamiltonian VAE (Caterini et al., 2018) -------------------------------------------------------------------------
def log_joint(model: HamiltonianVAE, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x, z) per image, from torch.distributions."""
    return Bernoulli(logits=model.decoder(z)).log_prob(x).flatten(1).sum(1) + Normal(0, 1).log_prob(z).sum(1)


def test_without_leapfrog_steps_or_tempering_the_hamiltonian_bound_is_the_vaes_elbo():
    model = HamiltonianVAE(SHAPE, leapfrog_steps=0, beta0=1.0, latent_dim=3)
    x = binary_images()
    torch.manual_seed(3)
    bound = model.elbo(x)
    torch.manual_seed(3)
    mu, logvar = model.posterior(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = mu + q.stddev * torch.randn_like(mu)
    torch.testing.assert_close(bound, log_joint(model, z, x) - q.log_prob(z).sum(1))


@pytest.mark.parametrize("beta0", [1.0, 0.3])
def test_a_hamiltonian_leapfrog_step_keeps_volume_and_tempering_scales_it_by_beta0_to_the_half_latent_dim(beta0):
    """log|det| of autograd's Jacobian in (z, rho): 0 for one leapfrog step; (d/2) log beta0 for the K tempered steps,
    which cool the momentum's variance from 1/beta0 to 1."""
    model = HamiltonianVAE(SHAPE, leapfrog_steps=3, step_size=0.4, beta0=beta0, latent_dim=3)
    x, state = binary_images(1), torch.randn(6, generator=torch.Generator().manual_seed(0))

    def leapfrog(s: torch.Tensor) -> torch.Tensor:
        return torch.cat(model.leapfrog(s[None, :3], s[None, 3:], x, create_graph=True)[:2], 1)[0]

    def flow(s: torch.Tensor) -> torch.Tensor:
        return torch.cat(model.flow(s[None, :3], s[None, 3:], x), 1)[0]

    for move, expected in [(leapfrog, 0.0), (flow, 3 / 2 * math.log(beta0))]:
        jacobian = torch.autograd.functional.jacobian(move, state)
        assert (jacobian - torch.eye(6)).abs().max() > 0.1  # far from the identity
        sign, log_det = torch.linalg.slogdet(jacobian)
        assert sign > 0
        torch.testing.assert_close(log_det, torch.tensor(expected), atol=1e-4, rtol=0)


def test_the_hamiltonian_bound_is_the_papers_tempered_leapfrog_step_by_step_with_torch_distributions():
    """K = 2 steps by hand: U = -log p(x, z) differentiated by autograd, a step size of its own in each dimension, the
    quadratic tempering in the form of the authors' Gaussian experiment (T_k = 1 + (T_0 - 1)(1 - k^2 / K^2),
    T_k = 1 / sqrt(beta_k)), and the bound with the tempering's log-det (d/2) log beta0."""
    beta0, steps = 0.3, 2
    model = HamiltonianVAE(SHAPE, leapfrog_steps=steps, step_size=0.2, max_step_size=0.5, beta0=beta0, latent_dim=2)
    with torch.no_grad():
        model.step_logits.copy_(torch.tensor([-1.0, 0.5]))
    x = binary_images()
    torch.manual_seed(4)
    bound = model.elbo(x)
    torch.manual_seed(4)
    mu, logvar = model.posterior(x)
    q, momentum = Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, beta0**-0.5)
    z0 = mu + q.stddev * torch.randn_like(mu)
    rho0 = momentum.stddev * torch.randn_like(mu)
    epsilon = 0.5 * torch.sigmoid(torch.tensor([-1.0, 0.5]))

    def grad_u(z: torch.Tensor) -> torch.Tensor:
        return -torch.autograd.grad(log_joint(model, z, x).sum(), z, create_graph=True)[0]

    def temperature(k: int) -> float:
        return 1 + (beta0**-0.5 - 1) * (1 - k**2 / steps**2)

    z, rho = z0, rho0
    for k in range(1, steps + 1):
        half = rho - epsilon / 2 * grad_u(z)
        z = z + epsilon * half
        rho = (half - epsilon / 2 * grad_u(z)) * temperature(k) / temperature(k - 1)
    expected = log_joint(model, z, x) + Normal(0, 1).log_prob(rho).sum(1) - q.log_prob(z0).sum(1)
    expected = expected - momentum.log_prob(rho0).sum(1) + 2 / 2 * math.log(beta0)
    torch.testing.assert_close(bound, expected)
    bound.sum().backward()  # through the leapfrog: the step sizes, the decoder and the encoder all learn
    trained = [model.step_logits, *model.decoder.parameters(), *model.encoder.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


WITHOUT_AUTOGRAD = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "loaded": contextlib.nullcontext}


@pytest.mark.parametrize("held_out", WITHOUT_AUTOGRAD)  # evaluate.py's; Lightning's val and test; autoencoders.load's
def test_the_hamiltonian_vae_takes_its_leapfrog_on_held_out_batches_without_autograd(held_out):
    model = HamiltonianVAE(SHAPE, leapfrog_steps=2, step_size=0.3, latent_dim=2)
    x = binary_images()
    torch.manual_seed(5)
    expected = [term.detach() for term in model.elbo_terms(x)]
    if held_out == "loaded":
        model.requires_grad_(False)
    torch.manual_seed(5)
    with WITHOUT_AUTOGRAD[held_out]():
        found = [term.clone() for term in model.elbo_terms(x)]
    assert not any(term.requires_grad for term in found)
    for term, training in zip(found, expected, strict=True):
        torch.testing.assert_close(term, training)


def test_compile_is_refused_for_the_hamiltonian_vae_whose_bound_needs_a_double_backward(tmp_path):
    with pytest.raises(UserError, match="compile=true cannot train model.leapfrog_steps=5"):
        check_config(compose_train(tmp_path, *TINY, "model=hamiltonian_vae", "compile=true"))
    check_config(compose_train(tmp_path, *TINY, "model=hamiltonian_vae", "compile=true", "model.leapfrog_steps=0"))


def test_the_hamiltonian_vae_refuses_a_first_step_size_not_below_its_bound():
    with pytest.raises(UserError, match="model.step_size=0.5 is not below model.max_step_size=0.5"):
        HamiltonianVAE(SHAPE, step_size=0.5, max_step_size=0.5)
