"""LightningDataModules: datasets and loaders for training; image handling itself lives in ``isc/``."""
