"""nstjax: neural style transfer (Gatys et al. 2015) in JAX."""

__version__ = "0.1.0"
