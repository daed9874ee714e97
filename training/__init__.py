"""Experiment layer on top of napari_sdunet's engine: data sets, training runs, evaluation, reproduction.

Run ``python -m training --help``. See training/RESULTS.md for the measured results.
"""
