"""Helpers with no ssmtune dependencies, importable from every layer."""
