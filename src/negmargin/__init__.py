"""negmargin: a reproduction of *Negative Margin Matters* (Liu et al., ECCV 2020)."""

__version__ = "0.1.0"
