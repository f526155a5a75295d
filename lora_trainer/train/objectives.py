"""The denoising objective: timesteps, noise, q_sample, targets, min-SNR weights and the loss.

Small pure functions with the behaviour of kohya-ss/sd-scripts' ``train_network.py``:

* timesteps are drawn uniformly from ``[min_timestep, max_timestep)`` (kohya's ``--min_timestep`` /
  ``--max_timestep``; ``max_timestep`` is exclusive, as in ``torch.randint``);
* ``noise_offset`` adds ``offset * randn(B, C, 1, 1)`` to the noise (kohya's ``apply_noise_offset``);
* the target is the noise for ``"epsilon"`` models and the velocity
  ``v = sqrt(a) * noise - sqrt(1 - a) * x0`` for ``"v_prediction"`` models;
* ``min_snr_weight`` is kohya's ``apply_snr_weight`` (``--min_snr_gamma``).

Every random draw takes an explicit :class:`torch.Generator`. Numbers are drawn in float32 on the
generator's device and then moved/cast to the latents' device and dtype, so a seed gives the same
values whatever dtype the latents have and, with a CPU generator, whatever device they live on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_trainer.contracts import PREDICTION_TYPES

__all__ = [
    "add_noise",
    "loss_per_sample",
    "min_snr_weight",
    "sample_noise",
    "sample_timesteps",
    "scaled_linear_alphas_cumprod",
    "snr",
    "target_for",
]


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stable Diffusion's noise schedule: ``cumprod(1 - betas)`` with
    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``.

    Computed in float64 (as ldm does) and returned in ``dtype`` (float32, like the WebUI model's buffer).
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal numbers drawn in float32 on the generator's device, then moved to ``device``/``dtype``."""
    gen_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None,
    num_train_timesteps: int = 1000,
    min_timestep: int = 0,
    max_timestep: int | None = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``batch`` integer timesteps (int64), uniform in ``[min_timestep, max_timestep)``.

    ``max_timestep=None`` means ``num_train_timesteps``. As in kohya, ``min_timestep == max_timestep``
    gives that one timestep for the whole batch. Drawn on the generator's device, returned on ``device``
    (default: the generator's device, or CPU).
    """
    if max_timestep is None:
        max_timestep = num_train_timesteps
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= min_timestep <= max_timestep <= num_train_timesteps:
        raise ValueError(
            f"need 0 <= min_timestep <= max_timestep <= num_train_timesteps, "
            f"got min_timestep={min_timestep}, max_timestep={max_timestep}, num_train_timesteps={num_train_timesteps}"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if device is None:
        device = gen_device
    if min_timestep == max_timestep:
        if max_timestep >= num_train_timesteps:
            raise ValueError(f"timestep {max_timestep} is out of range for {num_train_timesteps} train timesteps")
        return torch.full((batch,), max_timestep, dtype=torch.long, device=device)
    t = torch.randint(min_timestep, max_timestep, (batch,), generator=generator, device=gen_device, dtype=torch.long)
    return t.to(device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` (same device and dtype).

    With ``noise_offset`` (kohya's ``--noise_offset``), one extra normal number per sample and channel,
    times the offset, is added to every pixel of that channel: ``noise + offset * randn(B, C, 1, 1)``.
    The plain noise is drawn first, then the offset, so ``noise_offset=0`` and ``> 0`` share the base noise.
    """
    noise = _randn(tuple(latents.shape), generator, latents.device, latents.dtype)
    if noise_offset:
        if latents.ndim < 2:
            raise ValueError(f"noise_offset needs latents with a channel dimension, got shape {tuple(latents.shape)}")
        shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        offset = _randn(shape, generator, latents.device, torch.float32)
        noise = (noise.float() + float(noise_offset) * offset).to(latents.dtype)
    return noise


def _coefficients(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` in float32, shaped (B, 1, 1, ...) to broadcast against ``like``."""
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.to(device=like.device, dtype=torch.long)]
    a = a.reshape(a.shape[0], *([1] * (like.ndim - 1)))
    return a.sqrt(), (1.0 - a).sqrt()


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The forward process q(x_t | x_0): ``sqrt(a_t) * latents + sqrt(1 - a_t) * noise``.

    Computed in float32, returned in the latents' dtype.
    """
    sqrt_a, sqrt_one_minus_a = _coefficients(timesteps, alphas_cumprod, latents)
    return (sqrt_a * latents.float() + sqrt_one_minus_a * noise.float()).to(latents.dtype)


def target_for(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the model should predict: the noise (``"epsilon"``) or the velocity (``"v_prediction"``),
    ``v = sqrt(a_t) * noise - sqrt(1 - a_t) * latents``. Any other type raises ValueError."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        sqrt_a, sqrt_one_minus_a = _coefficients(timesteps, alphas_cumprod, latents)
        return (sqrt_a * noise.float() - sqrt_one_minus_a * latents.float()).to(latents.dtype)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` for each timestep (float32, on the timesteps' device)."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return a / (1.0 - a)


def min_snr_weight(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (kohya's ``apply_snr_weight``), float32, shape (B,).

    epsilon: ``min(snr, gamma) / snr``; v-prediction: ``min(snr, gamma) / (snr + 1)``.
    For epsilon, a zero SNR (zero-terminal-SNR schedules) gets weight 1, the limit of the formula.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=float(gamma))
    if v_prediction:
        return clipped / (s + 1.0)
    # min(snr, gamma) / snr is exactly 1 wherever snr <= gamma; computing it that way avoids 0/0.
    return torch.where(s <= gamma, torch.ones_like(s), clipped / s)


def loss_per_sample(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (mean over every dimension but the first), in float32, shape (B,).

    ``weights`` (B,) multiplies each sample's loss: kohya's per-dataset loss weight times min-SNR weights.
    The caller takes ``.mean()`` for the step's loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    if weights is not None:
        weights = torch.as_tensor(weights, device=loss.device, dtype=torch.float32)
        if weights.ndim != 0 and weights.shape != loss.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} does not match batch {tuple(loss.shape)}")
        loss = loss * weights
    return loss
