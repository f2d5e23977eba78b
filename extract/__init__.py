"""Extraction stage."""
