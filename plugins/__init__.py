"""hvae's first-party plugins; each registers through the public hooks like any other package."""
