"""Training methods, one plug-in module each (:class:`~medssl.training.methods.base.Method`).

A method is one module here; it becomes ``medssl-train <name>`` (and a valid config
``method:``) by one entry in :data:`medssl.training.methods.registry.REGISTRY`.
"""
