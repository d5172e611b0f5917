"""YODA core: time-dependent masks, masked loss and masked sampling.

Plain PyTorch, no BasicSR import: any diffusion model can use it (the paper's
plug-and-play claim). Equation numbers refer to Moser et al., "YODA: You Only
Diffuse Areas" (main paper).
"""
from .loss import masked_noise_loss
from .mask import (check_attention, check_lower_bound, diffused_steps_per_pixel, pixel_update_ratio,
                   time_dependent_mask)
from .sampler import (YODAConfig, initial_state, masked_reverse_step, predict_start_from_noise, q_posterior,
                      sample_loop, training_inputs)
from .schedule import DiffusionSchedule, make_beta_schedule, space_timesteps
from .sparse import SPARSE_MODES, SparseDenoiser, active_box, active_regions

__all__ = [
    'DiffusionSchedule', 'make_beta_schedule', 'space_timesteps', 'time_dependent_mask', 'check_attention',
    'check_lower_bound', 'diffused_steps_per_pixel', 'pixel_update_ratio', 'masked_noise_loss', 'YODAConfig',
    'initial_state', 'masked_reverse_step', 'predict_start_from_noise', 'q_posterior', 'sample_loop',
    'training_inputs', 'SparseDenoiser', 'active_box', 'active_regions', 'SPARSE_MODES'
]
