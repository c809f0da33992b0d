"""CUDA sources of sapsam-jax's GPU kernels (``*.cu``), installed as ``sapsam_jax.kernels``.

They are compiled at first use by ``sapsam_jax.preprocess._kernels.load_kernel`` with
``cupy.RawModule``; this file only makes the folder importable so the sources ship as package data.
"""
