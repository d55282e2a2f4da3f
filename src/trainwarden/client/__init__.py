"""trainwarden client."""
