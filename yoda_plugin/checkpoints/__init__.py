"""Published SR3 and SRDiff checkpoints: recognise their file layouts, map them onto our networks, convert them.

See :mod:`yoda_plugin.checkpoints.public` (``python scripts/convert_checkpoint.py`` is its command line);
:func:`load_network_weights` (:mod:`.loading`) loads BasicSR checkpoints and these files into a built network;
:mod:`.record` is the record a checkpoint carries beside its weights (what rebuilding its network and pipeline needs).
"""
from .loading import MIN_LOADED_SHARE, load_network_weights
from .public import (FORMATS, JANSPIRY_SR3, PUBLISHED_FILES, SRDIFF, PublicCheckpoint, convert_checkpoint,
                     count_parameters, detect_format, fit_network, format_yaml_block, missing_published_weights,
                     network_state_from_public, public_key_map, public_record, read_public_checkpoint)
from .record import (RECORD_FORMAT, RECORD_KEY, RecordError, compare_record, make_record, read_record,
                     record_differences, record_of, record_options)

__all__ = ['MIN_LOADED_SHARE', 'load_network_weights', 'FORMATS', 'JANSPIRY_SR3', 'SRDIFF', 'PublicCheckpoint',
           'convert_checkpoint', 'count_parameters', 'detect_format', 'fit_network', 'format_yaml_block',
           'network_state_from_public', 'public_key_map', 'read_public_checkpoint', 'PUBLISHED_FILES',
           'missing_published_weights', 'public_record', 'RECORD_FORMAT', 'RECORD_KEY', 'RecordError',
           'compare_record', 'make_record', 'read_record', 'record_differences', 'record_of', 'record_options']
