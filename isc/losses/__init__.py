"""Losses: ``ssl`` (Barlow Twins, BYOL / Momentum2-Teacher) and ``metric`` (D2LV, SSCD, XBM contrastive)."""
