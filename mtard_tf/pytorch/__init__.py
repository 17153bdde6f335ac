"""The optional PyTorch side (requirements-torch.txt): the import of published PyTorch checkpoints, the architectures as
PyTorch modules and the B-MTARD step in PyTorch eager mode; torch is imported here and nowhere else."""
