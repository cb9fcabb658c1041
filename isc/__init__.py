"""Framework-free core of the image copy detection toolkit.

Everything here is plain PyTorch / numpy / faiss / augly so it can be used from a notebook; the
Lightning and Hydra glue lives in ``lightning_modules/``, ``datamodules/``, ``callbacks/`` and ``run.py``.
"""

__version__ = "0.1.0"
