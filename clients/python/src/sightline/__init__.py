"""Sightline client SDK."""
