"""The version of bora_pyro: run folders record it, and pyproject.toml reads it from here."""

__version__ = "0.1.0"
