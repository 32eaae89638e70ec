"""First-party attention plugins (they land with their issues)."""
