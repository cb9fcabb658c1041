"""Stage 4, evaluation and inference: descriptors -> search -> post-processing -> official metrics and files.

- ``metrics``: official micro-AP, recall at precision 90, recall@rank (vectorised numpy).
- ``matches``: predictions and ground truth as id arrays.
- ``io``: the official CSV and HDF5 formats (validating readers, atomic writers).
- ``extract``: batched descriptor extraction from image files.
- ``search``: faiss / exact torch kNN and range search.
- ``postprocess``: PCA-whitening, L2 normalisation, score normalisation.
- ``pipeline``: the one evaluation settings object and descriptors -> predictions -> metrics, shared by
  ``run.py task=evaluate`` and the per-epoch retrieval callback.
"""
