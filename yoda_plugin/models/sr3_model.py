"""SR3 (Saharia et al.) with and without YODA, as a BasicSR model.

Image space: x0 = 2 * HR - 1, the unrefined component's mean is the upsampled
LR image, the network ``SR3UNet(z_t, cond, noise_level)`` gets the upsampled
LR image as condition and SR3's continuous noise level sqrt(gamma): training
draws it between sqrt(abar_k) and sqrt(abar_{k-1}), sampling uses sqrt(abar_k)
of the grid step (see :class:`~yoda_plugin.core.adapters.SR3Adapter`, the backbone).

Training noises the HR image (Eq. 3) and regresses the noise with the masked
loss (Eq. 10); with YODA the network input is M(t) * z_t (Eq. 11) unless
``yoda.mask_network_input`` is false. Validation and testing sample with the
EMA weights on ``val.sampler`` (default: DDPM on ``diffusion.sample_steps``;
the paper: T_train 500, T_eval 200) with the YODA blend (Eq. 12-14).
Everything else lives in :class:`~.base_model.DiffusionSRModel`.
"""
from basicsr.utils.registry import MODEL_REGISTRY

from .base_model import DiffusionSRModel
# Re-exported: scripts and tests import these from here.
from .checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state  # noqa: F401


@MODEL_REGISTRY.register()
class SR3Model(DiffusionSRModel):
    """SR3 diffusion SR; YODA on or off via the ``yoda`` option section (options: :class:`DiffusionSRModel`)."""
    backbone = 'sr3'  # everything SR3-specific is yoda_plugin.core.adapters.SR3Adapter

