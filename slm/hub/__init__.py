"""The HuggingFace Hub: every call to it, and what a run's model repo holds (its layout and manifest). Imports
slm.core only."""
