"""Encoders and the backbone bundle."""
