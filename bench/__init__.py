"""Benchmarks of mhpo_kernels against eager PyTorch (the reference) and other baselines."""
