"""Text for training and evaluation: the offline corpus built from packages, and held-out reading."""
