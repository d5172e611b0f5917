"""Experiment drivers built on the BasicSR runners (library code; the scripts only parse arguments)."""
