"""Grafana dashboards generated from code (specs.py -> generate.py -> *.json), and their queries."""
