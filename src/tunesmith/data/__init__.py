"""Data: sources, formats, splits, tokenization and collation."""
