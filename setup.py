#!/usr/bin/env python
"""YODA plugin for BasicSR: attention-guided, time-dependent masked diffusion for SR."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(here, 'yoda_plugin', '__init__.py'), encoding='utf-8') as f:
        for line in f:
            if line.startswith('__version__'):
                return line.split('=')[1].strip().strip("'\"")
    raise RuntimeError('no __version__ in yoda_plugin/__init__.py')


def read_readme():
    path = os.path.join(here, 'README.md')
    return open(path, encoding='utf-8').read() if os.path.exists(path) else ''


setup(
    name='yoda-plugin',
    version=read_version(),
    description='YODA (You Only Diffuse Areas) masked diffusion super-resolution as a BasicSR plugin',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['yoda_plugin', 'yoda_plugin.*']),
    # The converged demo models (scripts/benchmark_convergence.py --export; docs/convergence.md).
    package_data={'yoda_plugin': ['weights/*.pth', 'apps/examples/*.png']},
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'basicsr>=1.4.2',
        'mmengine>=0.10',
        'lpips>=0.1.4',
        'opencv-python>=4.5',
        'lmdb>=1.0',
        'pyyaml>=5.4',
        'tensorboard>=2.10',
        'numpy>=1.22',
        'tqdm>=4.0',
    ],
    extras_require={'test': ['pytest>=7', 'hypothesis>=6', 'scikit-image>=0.19', 'matplotlib>=3.5', 'import-linter>=2.0',
                             'selenium>=4.10'],
                    'plots': ['matplotlib>=3.5'],
                    'app': ['gradio>=6.0']},  # python -m yoda_plugin app (docs/app.md)
    entry_points={
        'console_scripts': [
            'yoda-train=yoda_plugin.train:main',
            'yoda-test=yoda_plugin.test:main',
            'yoda-demo=yoda_plugin.demo:main',
            'yoda-gpu-check=yoda_plugin.apps.gpu_check:main',
        ]
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
