"""First-party regularizers plugins (they land with their issues)."""
