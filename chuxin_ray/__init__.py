"""chuxin_ray: the Chuxin-Embedding recipe on Ray."""

__version__ = "0.1.0"
