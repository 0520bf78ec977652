"""dynaflip-adapt: field adaptation of DynaFLIP robot-vision backbones.

The package root stays import-light (no torch, h5py or mlflow) so that the CLI starts fast;
heavy modules are imported by the functions that need them.
"""

__version__ = "0.3.0.dev0"

__all__ = ["__version__"]
