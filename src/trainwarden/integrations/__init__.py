"""Callbacks for training frameworks: one module per framework, each an optional extra.

`trainwarden.integrations.lightning` needs ``trainwarden[lightning]`` and
`trainwarden.integrations.transformers` needs ``trainwarden[transformers]``. Importing this package
imports no framework; importing one of its modules imports that framework (and torch). The daemon
never imports either (a test checks it). Both callbacks are thin: they translate the framework's
hooks into the client's calls (`Reporter`, `AdaptiveClipper`, `PlannedInterrupt`) through
`trainwarden.integrations.core`, which holds what the two share.
"""
