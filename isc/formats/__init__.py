"""The bottom layer: files every stage reads or writes, so no stage imports a later one for them.

- ``files``: atomic writes (temp file + rename), used by every writer of the project.
- ``pairs``: scored (query, reference) pairs and ground truth as id arrays.
- ``pair_csv``: the official matching-track and ground-truth CSV files.
- ``descriptor_files``: descriptor HDF5 files in the two official layouts.
- ``pixels``: one conversion of any PIL image to RGB, for loading and editing alike.
"""
