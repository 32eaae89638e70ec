"""First-party flows plugins (they land with their issues)."""
