"""Models jetdet ships: small random-init reference architectures for the determinism tests and benchmark
(:mod:`jetdet.models.toy`)."""

from .toy import TinyDiT, TinyUNet, make_toy_inputs

__all__ = ["TinyUNet", "TinyDiT", "make_toy_inputs"]
