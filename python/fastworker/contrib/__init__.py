"""Integrations with frameworks around procrastinate."""
