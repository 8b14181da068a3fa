"""Fused hyper-convolution stage: PyTorch reference, Triton kernels, autograd function."""
