"""gist_assets."""
