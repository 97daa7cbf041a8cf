"""gist_core."""
