"""DiT's training objective: 1000-step linear DDPM schedule, the prediction's MSE plus the variational bound for
learned sigma. The network predicts the noise (DiT's ``epsilon``) or the velocity ``v = sqrt(a) eps - sqrt(1 - a) x0``
(Salimans & Ho 2022), recorded as its saved scheduler's ``prediction_type``."""

from __future__ import annotations

import math

import torch

# What a network trained here may predict, as diffusers' schedulers name it; DiT's noise prediction first.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def clean_and_noise(
    output: torch.Tensor, sample: torch.Tensor, alpha_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean image and the noise that a prediction of ``prediction_type`` (``epsilon``, ``v_prediction`` or
    ``sample``, as diffusers reads it) implies at the noised ``sample`` with ``alpha_cumprod`` (broadcastable)."""
    a, s = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * sample - s * output, a * output + s * sample
    if prediction_type == "sample":
        return output, (sample - a * output) / s
    raise ValueError(f"Unknown `prediction_type`={prediction_type!r}; allowed values: epsilon, v_prediction, sample.")


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    # Log-likelihood of data in [-1, 1] discretised to 256 bins (the decoder term at t = 0).
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Forward process and losses of DiT (guided-diffusion's ``L_hybrid``: MSE on noise + VB on variance)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = num_timesteps
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    @staticmethod
    def _take(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(t.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noised sample ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        return (
            self._take(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        prediction_type: str = PREDICTION_TYPES[0],
    ) -> dict:
        """Per-sample ``mse`` (of the prediction: noise, or velocity for ``v_prediction``), ``vb`` (bits/dim, learned
        sigma only) and their sum ``loss``."""
        channels = x0.shape[1]
        prediction = model_output[:, :channels]
        alpha = self._take(self.alphas_cumprod, t, x0)
        if prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        elif prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"Unknown `prediction_type`={prediction_type!r}; allowed values: {PREDICTION_TYPES}.")
        mse = ((prediction - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        if model_output.shape[1] == channels:
            return {"mse": mse, "vb": torch.zeros_like(mse), "loss": mse}
        variance = model_output[:, channels : 2 * channels]
        min_log = self._take(self.posterior_log_variance_clipped, t, x0)
        max_log = self._take(torch.log(self.betas), t, x0)
        fraction = (variance + 1) / 2
        model_log_variance = fraction * max_log + (1 - fraction) * min_log
        # The VB term trains only the variance: the mean comes from the detached prediction (the noise's image by
        # guided-diffusion's own tables, bit for bit).
        if prediction_type == "epsilon":
            pred_x0 = (
                self._take(self.sqrt_recip_alphas_cumprod, t, x0) * x_t
                - self._take(self.sqrt_recipm1_alphas_cumprod, t, x0) * prediction.detach()
            )
        else:
            pred_x0, _ = clean_and_noise(prediction.detach(), x_t, alpha, prediction_type)
        coef1, coef2 = self._take(self.posterior_mean_coef1, t, x0), self._take(self.posterior_mean_coef2, t, x0)
        model_mean = coef1 * pred_x0 + coef2 * x_t
        true_mean = coef1 * x0 + coef2 * x_t
        dims = tuple(range(1, x0.ndim))
        kl = _normal_kl(true_mean, min_log, model_mean, model_log_variance).mean(dim=dims) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).mean(dim=dims) / math.log(
            2.0
        )
        vb = torch.where(t == 0, nll, kl)
        return {"mse": mse, "vb": vb, "loss": mse + vb}
