"""The config's schema: sections, their checks, score options and the method registry."""
