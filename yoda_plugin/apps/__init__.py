"""Applications built on the library: the GPU check, the benchmarks' shared helpers, and the command lines
of data preparation (``prepare_data``) and attention precompute (``precompute_attention``).

Nothing in the library imports this package (the import-linter contract in ``.importlinter`` enforces it).
"""
