"""pneumo: pneumonia opacity detection on RSNA chest X-rays, built for the notebook experiment loop."""

__version__ = "0.1.0"
