"""Stage 4, evaluation and inference: views -> one extraction engine -> one post-processing -> search ->
aggregation -> metrics -> official files and the report.

- ``settings``: the one immutable settings object (``evaluation:`` config), parsed and checked once.
- ``views`` (view geometry), ``proposals`` (selective search), ``overlays`` (pasted-region detector),
  ``boxes`` (IoU, NMS): what parts of an image are described.
- ``extract``: the one extraction engine (views at every scale, one loop, one array type); ``shards``:
  its resumable cache.
- ``postprocess``: PCA-whitening, L2 normalisation, score normalisation, and the one post-processing object.
- ``search``: faiss / exact torch kNN and range search.
- ``matching``: global matching; ``aggregate`` and ``inference``: D2LV's test stage (views, crops, scales,
  ensembles).
- ``results``: the one result type; ``metrics``: official micro-AP, recall at P90, recall@rank.
- ``runner``: evaluate / predict / the test stage on a DISC21 folder, Hydra-free; ``report``: the HTML page.
"""
