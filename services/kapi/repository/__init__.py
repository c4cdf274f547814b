"""The model repository: versions, per-hardware variants, aliases, reports, change events."""
