"""`trainwarden demo`: a tiny CPU training job under supervision, with faults injected and healed."""
