"""The runner layer: everything between an option file and BasicSR's training / test pipelines.

* :mod:`.option_check`: the whole option file checked before anything is made (keys, types, registered types,
  keyword sections against the signatures they are passed to, our models' sections);
* :mod:`.settings`: the settings record of an experiment folder, and the refusal to resume with other settings;
* :mod:`.resume`: resuming from the newest complete checkpoint, on any device, mid-epoch;
* :mod:`.dist`: process groups with or without CUDA;
* :mod:`.patches`: every in-memory change to BasicSR, each with the BasicSR versions it targets;
* :mod:`.pipeline`: ``run_basicsr_pipeline``, what ``yoda_plugin/train.py`` and ``test.py`` run.

Option-file parsing itself (the safe YAML loader) is :mod:`yoda_plugin.utils.options`, and generic torch I/O
:mod:`yoda_plugin.utils.torch_io`: both sit at the bottom, usable without BasicSR. Importing this package imports
nothing of BasicSR; its modules do, when used.
"""
