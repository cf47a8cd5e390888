"""Errors the user can fix (bad gin, missing or mismatched checkpoint); drivers print one line."""


class ConfigError(ValueError):
  """Says what was wrong and what would be accepted."""
