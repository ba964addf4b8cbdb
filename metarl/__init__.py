"""metarl."""
