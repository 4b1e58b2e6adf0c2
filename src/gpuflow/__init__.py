"""gpuflow: run AI media jobs on a fleet of GPU machines, with Redis as the durable brain."""

__version__ = "0.1.0"
__all__ = ["__version__"]
