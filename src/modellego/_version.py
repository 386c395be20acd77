"""The single version string of modellego."""
__version__ = "0.1.0"
