"""Training scripts for the trained fixtures (not imported by the plugin at run time)."""
