"""Plain helpers shared by interfaces and workflows (no Nipype nodes here)."""
