"""Training utilities: ``optim`` (LARS, param groups, warm-up/flat/cosine), ``views`` (SSL two-view
augmentations) and ``dist`` (the one home of the ``torch.distributed`` helpers)."""
