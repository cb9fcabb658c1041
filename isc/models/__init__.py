"""Networks: what turns an image into a descriptor, and what training adds around it.

- ``trunks``: ResNet-50/152, ResNet-50-IBN-a, EfficientNet-Lite0 with their input statistics.
- ``pooling``: GeM and average pooling.
- ``checkpoints``: reading checkpoints of any layout and loading trunk weights from them.
- ``descriptor``: the descriptor model (trunk + pooling + head + L2) and its self-contained export file.
- ``heads``: fine-tuning heads (D2LV's BN neck, SSCD's projection) and WaveBlock.
- ``projectors``: self-supervised projector / predictor MLPs.
- ``momentum``: EMA teachers and momentum batch-norm (Momentum2-Teacher).
"""
