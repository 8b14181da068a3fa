"""Weight detokenization: PyTorch reference, Triton kernel."""
