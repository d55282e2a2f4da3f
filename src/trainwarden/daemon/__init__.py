"""The node daemon: scheduler, store export, HTTP, CLI and systemd integration."""
