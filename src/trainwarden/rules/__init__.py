"""trainwarden rules."""
