"""LightningModules: thin training glue around the framework-free models and losses in ``isc/``.

Modules receive already-built ``nn.Module``s (trunk, pooling, loss) and optimiser / scheduler partials
from Hydra (``_partial_: true``); nothing here looks names up in registries. Their common base class is in
:mod:`lightning_modules.base`.
"""
