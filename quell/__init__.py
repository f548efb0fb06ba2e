"""quell: real-time speech enhancement."""
