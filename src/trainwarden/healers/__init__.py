"""trainwarden healers."""
