"""Validation and testing for the diffusion models: split over ranks, per-image rows, reports.

:class:`ValidationMixin` replaces BasicSR's ``nondist_validation`` /
``dist_validation``: every rank samples its share of the images
(i = rank, rank + N, ...) with seed ``val.sample_seed + i``, rank 0 gathers
the rows, logs the metrics, the YODA pixel-update share, the seconds per
image and the sampler, and in test mode writes ``metrics_<dataset>.csv`` and
``summary_<dataset>.json``.
"""
import csv
import json
import os
import time
from os import path as osp

import torch
from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from tqdm import tqdm


def metric_takes_lq(metric_opt: dict) -> bool:
    """Whether the registered metric of ``metric_opt['type']`` declares an ``lq`` parameter (the LR input).

    BasicSR passes only ``img`` (SR) and ``img2`` (HR); metrics that check their keyword arguments (LPIPS)
    would refuse an extra ``lq``, so only those that name it get it.
    """
    import inspect
    from basicsr.utils.registry import METRIC_REGISTRY
    try:
        func = METRIC_REGISTRY.get(metric_opt.get('type'))
    except KeyError:
        return False  # calculate_metric reports the unknown type
    try:
        return 'lq' in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class ValidationMixin:
    """Needs ``self.val_opt`` (:class:`~.sections.ValOptions`), ``self.pipeline`` and the model's ``test``."""

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        """BasicSR's, except that its call after the training loop validates the real last iteration, once.

        BasicSR's loop validates once more after it ends, with its counter past
        the last iteration (an 8-iteration run reports "@ 10 iter"): the most
        expensive validation twice, and a tensorboard step that clashes with a
        resumed run's real one. ``last_iter`` is the last iteration trained.
        """
        if self.opt['is_train']:
            last = getattr(self, 'last_iter', None)
            name = dataloader.dataset.opt['name']
            done = self.__dict__.setdefault('_validated_at', set())
            if last is not None and current_iter > last:
                if (name, last) in done:
                    get_root_logger().info(f'Validation {name}: iteration {last} already validated; '
                                           'not repeating it after the training loop.')
                    return
                current_iter = last
            done.add((name, current_iter))
        super().validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validation(dataloader, current_iter, tb_logger, save_img, rank=0, world_size=1)

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Every rank samples its share of the images (i = rank, rank + N, ...); rank 0 gathers.

        BasicSR validates on rank 0 only, leaving the other GPUs idle through
        hundreds of sampling steps per image. Image i uses seed ``sample_seed + i``
        whichever rank samples it, so results equal a single-process run.
        """
        self._validation(dataloader, current_iter, tb_logger, save_img, rank=self.opt['rank'],
                         world_size=self.opt['world_size'])

    def _sample_row(self, idx, val_data, dataset_name, current_iter, tb_logger, save_img) -> dict:
        """Sample one image, save/log it, and return its row (metrics, update ratio, seconds, sparse share)."""
        val_opt = self.val_opt
        metrics_opt = val_opt.metrics or {}
        img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
        self.feed_data(val_data)
        start = time.perf_counter()
        self.test(seed=None if val_opt.sample_seed is None else val_opt.sample_seed + idx)
        seconds = time.perf_counter() - start
        ratio = float(self.update_ratio().mean())
        visuals = self.get_current_visuals()
        sr_img = tensor2img([visuals['result']])
        metric_data = {'img': sr_img}
        if 'gt' in visuals:
            metric_data['img2'] = tensor2img([visuals['gt']])
        lq_img = tensor2img([visuals['lq']]) if 'lq' in visuals else None
        if save_img:
            folder, suffix = self._image_folder(dataset_name, img_name, current_iter)
            imwrite(sr_img, osp.join(folder, f'{img_name}_{suffix}.png'))
            if val_opt.save_attention and 'attention' in visuals:
                imwrite(tensor2img([visuals['attention']]), osp.join(folder, f'{img_name}_attention.png'))
        row = {'index': idx, 'image': img_name}
        if self._tb_images_wanted and idx < val_opt.tb_images:  # logged by rank 0, whichever rank sampled it
            row['tb_strip'] = self._image_strip(visuals)
        for name, opt_ in metrics_opt.items():
            data = metric_data
            if lq_img is not None and metric_takes_lq(opt_):  # e.g. calculate_lr_psnr: LR consistency
                data = {**metric_data, 'lq': lq_img}
            row[name] = float(calculate_metric(data, opt_))
        row.update(update_ratio=ratio, seconds=seconds)
        stats = getattr(self, 'sparse_stats', None)
        if stats:  # val.sparse: share of the dense network work actually done
            row['sparse_pixels'] = stats['pixels'] / max(1, stats['dense_pixels'])
        del self.lq, self.lq_up, self.output
        if hasattr(self, 'gt'):
            del self.gt
        return row

    def _validation(self, dataloader, current_iter, tb_logger, save_img, rank, world_size):
        from torch.utils.data import default_collate
        dataset = dataloader.dataset
        dataset_name = dataset.opt['name']
        metrics_opt = self.val_opt.metrics or {}
        indices = range(rank, len(dataset), world_size)
        pbar = tqdm(total=len(indices), unit='image') if self.val_opt.pbar and rank == 0 else None
        # Only rank 0 holds BasicSR's tensorboard logger; the other ranks decide as BasicSR's init_tb_loggers does.
        logger_opt = self.opt.get('logger') or {}
        self._tb_images_wanted = tb_logger is not None if world_size == 1 else bool(
            self.opt.get('is_train') and logger_opt.get('use_tb_logger') and 'debug' not in self.opt['name'])
        rows = []
        for idx in indices:
            rows.append(self._sample_row(idx, default_collate([dataset[idx]]), dataset_name, current_iter, tb_logger,
                                         save_img))
            if pbar is not None:
                pbar.update(1)
                pbar.set_description(f'Test {rows[-1]["image"]}')
        if pbar is not None:
            pbar.close()
        if world_size > 1:
            from mmengine.dist import all_gather_object
            rows = [r for part in all_gather_object(rows) for r in part]
        rows.sort(key=lambda r: r['index'])  # summation order of a single process: identical means
        strips = [(r['image'], r.pop('tb_strip')) for r in rows if 'tb_strip' in r]
        if tb_logger is not None:
            for img_name, strip in strips:
                tb_logger.add_image(f'images/{dataset_name}/{img_name}', strip, current_iter)
        count = max(len(rows), 1)
        self.metric_results = {name: sum(r[name] for r in rows) / count for name in metrics_opt}
        self.val_extra = {'update_ratio': sum(r['update_ratio'] for r in rows) / count,
                          'sec_per_image': sum(r['seconds'] for r in rows) / count}
        if rows and all('sparse_pixels' in r for r in rows):
            self.val_extra['sparse_pixels'] = sum(r['sparse_pixels'] for r in rows) / count
        if rank != 0:
            return
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
            for name, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, name, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        get_root_logger().info(
            f'Validation {dataset_name}: YODA pixel-update share vs full diffusion '
            f'{self.val_extra["update_ratio"]:.4f}; '
            f'sampling {self.val_extra["sec_per_image"]:.2f} s/image (sampler {self.sampler_label()}'
            + (f', {world_size} ranks' if world_size > 1 else '') + ')'
            + (f'; sparse sampling evaluated {self.val_extra["sparse_pixels"]:.4f} of the dense network pixels'
               if 'sparse_pixels' in self.val_extra else ''))
        if tb_logger is not None:
            for k, v in self.val_extra.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{k}', v, current_iter)
        if self.opt['is_train']:
            self._append_history(dataset_name, current_iter)
        else:
            self._write_report(dataset_name, [{k: v for k, v in r.items() if k != 'index'} for r in rows])

    def sampler_label(self) -> str:
        """E.g. ``ddpm/200`` or ``ddim(eta=0.5)/50``: the sampler type and its number of steps."""
        return self.val_opt.sampler_config.label(self.pipeline.steps)

    def _append_history(self, dataset_name, current_iter):
        """One row per training validation in ``<experiment>/validation_<dataset>.csv`` (metrics over iterations).

        After a resume, iterations validated again appear twice; the last row of an iteration is the current run's.
        """
        path = osp.join(self.opt['path']['experiments_root'], f'validation_{dataset_name}.csv')
        row = {'iter': current_iter, **self.metric_results, **self.val_extra}
        new_file = not osp.isfile(path)
        with open(path, 'a', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    @master_only
    def _write_report(self, dataset_name, rows):
        """Per-image CSV and a summary JSON beside BasicSR's test log."""
        root = self.opt['path'].get('results_root') or self.opt['path']['log']
        os.makedirs(root, exist_ok=True)
        csv_path = osp.join(root, f'metrics_{dataset_name}.csv')
        with open(csv_path, 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ['image'])
            writer.writeheader()
            writer.writerows(rows)
        summary = {'dataset': dataset_name, 'images': len(rows), 'metrics': self.metric_results,
                   'sampler': self.val_opt.sampler_config.as_dict(), 'sample_steps': self.pipeline.steps,
                   'yoda': self.yoda.as_dict(), 'colour_fix': self.val_opt.colour_fix, **self.val_extra}
        with open(osp.join(root, f'summary_{dataset_name}.json'), 'w', encoding='utf-8') as f:
            json.dump(summary, f, indent=2)
        get_root_logger().info(f'Wrote {csv_path} and summary_{dataset_name}.json')

    def _image_folder(self, dataset_name, img_name, current_iter):
        vis = self.opt['path']['visualization']
        if self.opt['is_train']:
            return osp.join(vis, img_name), str(current_iter)
        return osp.join(vis, dataset_name), self.val_opt.suffix or self.opt['name']

    @staticmethod
    def _image_strip(visuals) -> torch.Tensor:
        """The tensorboard image of one sample: bicubic-upsampled LR | SR | HR (| attention), CHW in [0, 1]."""
        tiles = [visuals['lq_up'][0], visuals['result'][0]]
        if 'gt' in visuals:
            tiles.append(visuals['gt'][0])
        if 'attention' in visuals:
            tiles.append(visuals['attention'][0].expand(3, -1, -1))
        return torch.cat(tiles, dim=2).clamp(0, 1)
