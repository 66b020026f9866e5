"""harmonize."""
