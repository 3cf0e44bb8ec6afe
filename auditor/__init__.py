"""auditor: audit PyTorch image classifiers for spurious cues, with HTML and PDF reports."""

__version__ = "0.1.0"
