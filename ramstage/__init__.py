"""ramstage: keeps ML model checkpoints in RAM behind stable links, and keeps that promise
honest."""

__version__ = "0.1.0"
