"""Stage 1, data and copy generation: DISC21 layout and image loading, classes of copies and the P x K
sampler, the benchmark builder (and the embedded default), and generation of augmented-copy training sets.

- ``images``: DISC21 layout, ids, robust image loading with clear errors.
- ``copies``: classes of copies (on disk or on the fly) and the P x K sampler.
- ``benchmark``: DISC21-style benchmark builder and the embedded default benchmark.
- ``generate``: sharded, resumable generation of D2LV training sets.

The copy edits themselves live in :mod:`isc.augment`.
"""
