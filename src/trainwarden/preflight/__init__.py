"""Node preflight: is this node fit to start a training job? (`trainwarden preflight`).

Each check family is one module that runs the daemon's own collector once and judges its
samples (the GPU health rule, the XID catalog), so a preflight and the daemon can never
disagree about what a fault is. `runner` runs them under one deadline; `record` keeps the
last result for the daemon to export and journals it.
"""
