"""rankgrpo: a minimal PyTorch reference implementation of ConvRec-R1 / Rank-GRPO."""
__version__ = "0.1.0"
