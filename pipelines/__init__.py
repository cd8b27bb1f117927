"""Pipeline definitions; the compiled YAML of each sits beside its source."""
