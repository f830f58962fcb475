"""Benchmarks that hold `retina` against a bare training loop on the real HRF photos.

Run ``python -m benchmarks.run`` from the repository root; see ``benchmarks/README.md``.
"""
