"""YODA core: time-dependent masks, masked loss, samplers, backbones (adapters) and the sampling pipeline.

Plain PyTorch, no BasicSR, OpenCV or LMDB import: any diffusion model can use
it (the paper's plug-and-play claim), and ``import yoda_plugin.core`` works
without them. Equation numbers refer to Moser et al., "YODA: You Only Diffuse
Areas" (main paper).
"""
from .adapters import (BACKBONES, NetworkAdapter, SR3Adapter, SRDiffAdapter, SRDiffConfig, backbone_for_model_type,
                       get_backbone, register_backbone)
from .loss import masked_noise_loss
from .mask import (YODAMask, check_attention, check_lower_bound, diffused_steps_per_pixel, pixel_update_ratio,
                   time_dependent_mask)
from .options import build_section
from .pipeline import DiffusionSR, pad_inputs, super_resolve
from .samplers import (SAMPLERS, DDIMSampler, DDPMSampler, DPMSolverSampler, Sampler, SamplerConfig,
                       predict_noise_from_start, predict_start_from_noise, q_posterior, sample)
from .schedule import PREDICTIONS, DiffusionSchedule, make_beta_schedule, space_timesteps
from .sparse import SPARSE_MODES, SparseConfig, SparseDenoiser, active_box, active_regions
from .tiling import TiledDenoiser, TilingConfig
from .yoda import LR_NOISE_MODES, YODAConfig, YODASampler, training_inputs

__all__ = [
    'DiffusionSchedule', 'PREDICTIONS', 'make_beta_schedule', 'space_timesteps', 'YODAMask', 'time_dependent_mask',
    'check_attention', 'check_lower_bound', 'diffused_steps_per_pixel', 'pixel_update_ratio', 'masked_noise_loss',
    'YODAConfig', 'YODASampler', 'LR_NOISE_MODES', 'training_inputs', 'Sampler', 'DDPMSampler', 'DDIMSampler',
    'DPMSolverSampler', 'SAMPLERS', 'SamplerConfig', 'sample', 'predict_start_from_noise', 'predict_noise_from_start',
    'q_posterior', 'NetworkAdapter', 'SR3Adapter', 'SRDiffAdapter', 'SRDiffConfig', 'BACKBONES', 'register_backbone',
    'get_backbone', 'backbone_for_model_type', 'DiffusionSR', 'super_resolve', 'pad_inputs',
    'SparseConfig',
    'SparseDenoiser', 'active_box', 'active_regions', 'SPARSE_MODES', 'TiledDenoiser', 'TilingConfig',
    'build_section'
]
