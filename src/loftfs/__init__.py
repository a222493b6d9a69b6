"""loftfs: a multi-tenant cloud file system for AI training and inference."""

__version__ = "0.1.0"
