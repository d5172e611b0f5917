"""SR3Model in-process: a training step and sampling, float32 and bf16 autocast, option errors."""
import random

import pytest
import torch
from basicsr.data import build_dataset
from basicsr.models import build_model
from torch.utils.data import default_collate

from conftest import mentions, tiny_options


def model_and_batch(tiny_data, **overrides):
    opt = tiny_options(tiny_data, **overrides)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = {}
    ds_opt = dict(opt['datasets']['train'], phase='train', scale=opt['scale'])
    batch = default_collate([build_dataset(ds_opt)[i] for i in range(2)])
    return build_model(opt), batch


@pytest.mark.parametrize('amp', [None, 'bf16', 'fp16'])
def test_training_step_and_sampling(tiny_data, amp):
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data, train__amp=amp, val__amp=amp)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(batch)
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert torch.isfinite(torch.as_tensor(log['l_pix'])) and 0 < float(log['mask_ratio']) <= 1
    assert any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    out = model.sample(seed=0)
    assert out.shape == batch['gt'].shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    again = model.sample(seed=0)
    assert torch.equal(out, again), 'a seeded sample is reproducible'


def test_amp_option_errors(tiny_data):
    with pytest.raises(ValueError, match=mentions('val.amp', 'bf16', 'fp16', "'int8'")):
        model_and_batch(tiny_data, val__amp='int8')
    with pytest.raises(ValueError, match=mentions('train.amp', 'bf16', 'fp16', "'float16'")):
        model_and_batch(tiny_data, train__amp='float16')


def test_fp16_training_scales_the_loss_and_resumes_its_scale(tiny_data, tmp_path):
    model, batch = model_and_batch(tiny_data, train__amp='fp16')
    assert model.grad_scaler.get_scale() == 2.0**16 and model.grad_scaler.is_enabled()
    model.feed_data(batch)
    model.optimize_parameters(1)
    assert model.grad_scaler._growth_tracker.item() == 1  # the step went through the scaler (finite gradients)
    model.grad_scaler.update(1024.0)  # a scale a long run could have backed off to
    model.opt['path']['training_states'] = str(tmp_path)
    model.save_training_state(0, 1)
    state = torch.load(tmp_path / '1.state', weights_only=True)  # as the runners load it
    assert state['grad_scaler']['scale'] == 1024.0
    fresh, _ = model_and_batch(tiny_data, train__amp='fp16')
    fresh.resume_training(state)
    assert fresh.grad_scaler.get_scale() == 1024.0
    plain, _ = model_and_batch(tiny_data)
    plain.opt['path']['training_states'] = str(tmp_path / 'plain')
    (tmp_path / 'plain').mkdir()
    plain.save_training_state(0, 1)  # float32 training saves no scaler state
    assert 'grad_scaler' not in torch.load(tmp_path / 'plain' / '1.state', weights_only=True)
    assert plain.grad_scaler is None


def test_yoda_model_refuses_batches_without_attention(tiny_data):
    model, batch = model_and_batch(tiny_data)
    del batch['attention']
    with pytest.raises(ValueError, match='dataroot_attention'):
        model.feed_data(batch)


def test_sparse_sampling_in_the_model_runs_and_counts(tiny_data):
    model, batch = model_and_batch(tiny_data, val__sparse={'enabled': True, 'margin': 0, 'max_fraction': 1.0})
    model.feed_data(batch)
    out = model.sample(seed=0)
    assert out.shape == batch['gt'].shape
    assert model.sparse_stats['calls'] > 0
    with pytest.raises(ValueError, match='val.sparse.margn'):
        model_and_batch(tiny_data, val__sparse={'margn': 3})
    for bad, parts in (({'mode': 'tiles'}, ('val.sparse.mode', "'regions'", "'tiles'")),
                       ({'margin': -1}, ('val.sparse.margin', '>= 0', '-1')),
                       ({'margin': 2.5}, ('val.sparse.margin', '>= 0', '2.5')),
                       ({'granularity': 0}, ('val.sparse.granularity', '>= 1', 'got 0')),
                       ({'region_cost': -5}, ('val.sparse.region_cost', '>= 0', '-5')),
                       ({'max_fraction': 0}, ('val.sparse.max_fraction', '(0, 1]', 'got 0')),
                       ({'enabled': 'yes'}, ('val.sparse.enabled', "'yes'"))):
        with pytest.raises(ValueError, match=mentions(*parts)):
            model_and_batch(tiny_data, val__sparse={'enabled': True, **bad})


def test_missing_lpips_weights_fail_at_model_setup(tiny_data, monkeypatch, tmp_path):
    monkeypatch.delenv('YODA_LPIPS_ALEXNET', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    metrics = {'lpips': {'type': 'calculate_lpips'}}
    with pytest.raises(FileNotFoundError, match='alexnet-owt-7be5be79.pth'):
        model_and_batch(tiny_data, val__metrics=metrics)


@pytest.mark.slow  # torch.compile (aot_eager) of the UNet: ~20 s on a busy 2-core machine
def test_channels_last_and_compile_match_the_plain_model(tiny_data):
    """Fast-path options change memory layout / wrap forward, not results (CPU; compile with the eager backend)."""
    results = []
    for extra in ({}, {'train__channels_last': True, 'val__channels_last': True},
                  {'train__compile': {'backend': 'eager'}, 'val__compile': {'backend': 'eager'}}):
        torch.manual_seed(0)
        random.seed(0)  # the dataset's crops and flips
        model, batch = model_and_batch(tiny_data, **extra)
        torch.manual_seed(1)
        model.feed_data(batch)
        model.optimize_parameters(1)
        results.append((float(model.get_current_log()['l_pix']), model.sample(seed=0),
                        sorted(model.get_bare_model(model.net_g).state_dict())))
    base = results[0]
    for loss, out, keys in results[1:]:
        assert loss == pytest.approx(base[0], rel=1e-5, abs=1e-6)
        assert torch.allclose(out, base[1], atol=1e-4)
        assert keys == base[2], 'checkpoint keys must not change'
    with pytest.raises(ValueError, match='train.compile'):
        model_and_batch(tiny_data, train__compile='yes')


# -- the one sampling pipeline ------------------------------------------------------------------------------
@pytest.mark.parametrize('yoda, variance', [(True, 'posterior'), (False, 'posterior'), (True, 'beta')],
                         ids=['yoda', 'vanilla', 'yoda-beta'])
def test_default_sampling_equals_the_pre_refactor_loop_bit_for_bit(tiny_data, yoda, variance):
    """Default options (DDPM on diffusion.sample_steps) reproduce the old sample_loop exactly."""
    from reference_ddpm import reference_sample_loop
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data, yoda=yoda, diffusion__variance=variance)
    model.feed_data(batch)
    out = model.sample(seed=3)
    net = model.net_g_ema
    schedule = model.schedule.respace(5)  # tiny_options: T = 100, sample_steps 5
    cond = batch['lq_up'] * 2 - 1

    def denoise(z_in, k):  # the old SR3Model._denoise
        return net(z_in, cond, schedule.gather('sqrt_alphas_cumprod', k, z_in).view(-1))

    z = reference_sample_loop(denoise, schedule, cond, batch['attention'] if yoda else None, 0.3, 'marginal', True,
                              torch.Generator().manual_seed(3), (-1.0, 1.0), variance)
    assert torch.equal(out, ((z + 1) / 2).clamp(0, 1))
    assert model.sample_schedule.num_steps == 5 and torch.equal(model.sample_schedule.timesteps, schedule.timesteps)


@pytest.mark.parametrize('sampler', [{'type': 'ddim', 'steps': 4}, {'type': 'ddim', 'steps': 3, 'eta': 0.5},
                                     {'type': 'dpmpp_2m', 'steps': 4}], ids=['ddim', 'ddim-eta', 'dpmpp_2m'])
def test_val_sampler_through_the_model(tiny_data, sampler):
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data, val__sampler=sampler)
    assert model.pipeline.steps == sampler['steps'] and model.pipeline.sampler.name == sampler['type']
    assert model.sampler_label().startswith(sampler['type']) and model.sampler_label().endswith(f'/{sampler["steps"]}')
    model.feed_data(batch)
    model.test(seed=0)
    out = model.output
    assert out.shape == batch['gt'].shape and bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    model.test(seed=0)
    assert torch.equal(model.output, out), 'seeded sampling is reproducible'
    default, _ = model_and_batch(tiny_data)
    default.net_g_ema.load_state_dict(model.net_g_ema.state_dict())
    default.feed_data(batch)
    assert not torch.equal(default.sample(seed=0), out), 'the sampler option is used'


def test_bad_val_sampler_options_name_the_key(tiny_data):
    for bad, parts in (({'tpye': 'ddim'}, ('val.sampler.tpye', 'val.sampler.type')),
                       ({'type': 'euler'}, ('val.sampler.type', "'ddim'", "'euler'")),
                       ({'type': 'ddim', 'steps': 0}, ('val.sampler.steps', 'got 0')),
                       ({'type': 'ddim', 'steps': 101}, ('val.sampler.steps', 'diffusion.num_timesteps=100', '101')),
                       ({'type': 'ddim', 'eta': 2}, ('val.sampler.eta', '[0, 1]', 'got 2')),
                       ({'type': 'ddpm', 'eta': 0.5}, ('val.sampler.eta', 'DDIM')),
                       ('ddim', ('val.sampler', "'ddim'"))):
        with pytest.raises(ValueError, match=mentions(*parts)):
            model_and_batch(tiny_data, val__sampler=bad)


def test_tiled_sampling_is_accepted_for_sr3(tiny_data):
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data, val__tile_size=16, val__tile_overlap=8)
    assert model.pipeline.tiling.enabled and model.opt['val']['tile_size'] == 16  # options are not edited
    model.feed_data(batch)
    out = model.sample(seed=0)
    assert out.shape == batch['gt'].shape and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match=mentions('val.tile_size', 'multiple of 2', '15')):
        model_and_batch(tiny_data, val__tile_size=15, val__tile_overlap=8)
    with pytest.raises(ValueError, match=mentions('val.tile_sise', 'val.tile_size')):
        model_and_batch(tiny_data, val__tile_sise=16)


def test_option_sections_refuse_bad_values(tiny_data):
    for overrides, parts in (({'diffusion__variance': 'fixed'}, ('diffusion.variance', "'posterior'", "'fixed'")),
                             ({'diffusion__clip_denoised': 'yes'}, ('diffusion.clip_denoised', "'yes'")),
                             ({'train__nan_policy': 'ignore'}, ('train.nan_policy', "'skip'", "'ignore'")),
                             ({'val__channels_last': 1}, ('val.channels_last', 'got 1'))):
        with pytest.raises(ValueError, match=mentions(*parts)):
            model_and_batch(tiny_data, **overrides)


def test_build_pipeline_from_options_is_the_models_pipeline(tiny_data):
    """yoda_plugin.config.build_pipeline (the inference API's builder) == the model's pipeline."""
    import copy

    from yoda_plugin.config import build_pipeline
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data)
    opt = tiny_options(tiny_data)
    before = copy.deepcopy(opt)
    pipe = build_pipeline(model.sampling_net(), opt)
    model.feed_data(batch)
    out, info = pipe(model.lq, model.lq_up, model.attention, torch.Generator().manual_seed(1))
    assert torch.equal(out, model.sample(seed=1)) and info['sparse_stats'] is None
    over = build_pipeline(model.sampling_net(), opt, sampler={'type': 'ddim', 'steps': 3}, amp='bf16',
                          tiling={'tile_size': 17, 'round': True}, sparse={'enabled': True})
    assert over.steps == 3 and over.sampler.name == 'ddim' and over.amp_dtype == torch.bfloat16
    assert (over.tiling.tile_size, over.tiling.tile_overlap) == (16, 4) and over.sparse.enabled
    assert build_pipeline(model.sampling_net(), opt, sample_steps=7).steps == 7
    assert opt == before, 'nothing is written into the options'
    with pytest.raises(ValueError, match=r'val\.sampler\.tpye'):
        build_pipeline(model.sampling_net(), opt, sampler={'tpye': 'ddim'})
    with pytest.raises(ValueError, match=mentions('model_type', "'SRModel'", 'SR3Model', 'SRDiffModel')):
        build_pipeline(model.sampling_net(), {**opt, 'model_type': 'SRModel'})


def test_v_prediction_trains_on_v_and_samples_through_eps(tiny_data):
    """diffusion.prediction: v changes the loss target and the sampler's eps, nothing else (same draws)."""
    from yoda_plugin.core import training_inputs
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data, diffusion__prediction='v')
    assert model.schedule.prediction == 'v' and model.pipeline.sampler.schedule.prediction == 'v'
    model.feed_data(batch)
    adapter = model.train_adapter()
    inputs = training_inputs(model.schedule, adapter.to_space(model.gt), None, True, torch.Generator().manual_seed(0))
    g = inputs['noise_level'].view(-1, 1, 1, 1)
    assert torch.allclose(inputs['target'], g * inputs['noise'] - (1 - g * g).sqrt() * adapter.to_space(model.gt))
    model.optimize_parameters(1)
    assert torch.isfinite(torch.as_tensor(model.get_current_log()['l_pix']))
    k = torch.full((2, ), 3)
    z = torch.randn_like(model.gt)
    sampling = model.make_adapter(model.get_bare_model(model.net_g), model.pipeline.sampler.schedule, None, False)
    raw = sampling.network_output(z, k)
    level = model.pipeline.sampler.schedule.noise_level(k).float().view(-1, 1, 1, 1)
    assert torch.allclose(sampling.net_fn(z, k), level * raw + (1 - level * level).sqrt() * z, atol=1e-6)
    out = model.sample(seed=0)
    assert out.shape == batch['gt'].shape and float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ValueError, match=mentions('diffusion.prediction', "'velocity'")):
        model_and_batch(tiny_data, diffusion__prediction='velocity')


def test_ema_warmup_follows_the_network_early_and_caps_at_ema_decay(tiny_data):
    from yoda_plugin.models.base_model import ema_decay_at
    assert ema_decay_at(0.999, 0, True) == 0.1 and ema_decay_at(0.999, 1, True) == 2 / 11
    assert ema_decay_at(0.999, 100000, True) == 0.999 and ema_decay_at(0.999, 1, False) == 0.999
    torch.manual_seed(0)
    model, batch = model_and_batch(tiny_data, train__ema_decay=0.999, train__ema_warmup=True)
    ema_before = {k: v.clone() for k, v in model.net_g_ema.state_dict().items()}
    model.feed_data(batch)
    model.optimize_parameters(1)
    net = model.net_g.state_dict()
    for name, ema in model.net_g_ema.state_dict().items():
        if ema.is_floating_point():
            expected = ema_before[name] * (2 / 11) + net[name] * (9 / 11)
            assert torch.allclose(ema, expected, atol=1e-6), name
    with pytest.raises(ValueError, match=mentions('train.ema_warmup', "'yes'")):
        model_and_batch(tiny_data, train__ema_warmup='yes')
