"""Model files and training loops that use define_ops.DeFINE (language models, translation)."""
