"""Losses, torch only. Importing the package registers the built-in preference losses (align.losses.preference)."""

from align.losses import dpo, rank  # noqa: F401 - registration
