"""sapsam-jax: GPU-accelerated lung-CT preprocessing and JAX training for SAPSAM.

Zusag et al., "Sparsely Annotated Pathological Sign Activation Maps" (2019). The pipeline reads
top to bottom: ``io`` -> ``preprocess`` -> ``data`` -> ``models`` -> ``train`` -> ``explain`` ->
``evaluate``; see docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
