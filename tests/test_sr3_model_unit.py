"""SR3Model in-process: a training step and sampling, float32 and bf16 autocast, option errors."""
import random

import pytest
import torch
from basicsr.data import build_dataset
from basicsr.models import build_model
from torch.utils.data import default_collate

from conftest import tiny_options


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
    with pytest.raises(ValueError, match='val.amp must be'):
        model_and_batch(tiny_data, val__amp='int8')
    with pytest.raises(ValueError, match='train.amp must be'):
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
    for bad, message in (({'mode': 'tiles'}, 'val.sparse.mode must be one of'),
                         ({'margin': -1}, 'val.sparse.margin must be an integer >= 0'),
                         ({'margin': 2.5}, 'val.sparse.margin must be an integer >= 0'),
                         ({'granularity': 0}, 'val.sparse.granularity must be an integer >= 1'),
                         ({'region_cost': -5}, 'val.sparse.region_cost must be >= 0'),
                         ({'max_fraction': 0}, 'val.sparse.max_fraction must be in'),
                         ({'enabled': 'yes'}, 'val.sparse.enabled must be true or false')):
        with pytest.raises(ValueError, match=message):
            model_and_batch(tiny_data, val__sparse={'enabled': True, **bad})


def test_missing_lpips_weights_fail_at_model_setup(tiny_data, monkeypatch, tmp_path):
    monkeypatch.delenv('YODA_LPIPS_ALEXNET', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    metrics = {'lpips': {'type': 'calculate_lpips'}}
    with pytest.raises(FileNotFoundError, match='alexnet-owt-7be5be79.pth'):
        model_and_batch(tiny_data, val__metrics=metrics)


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
