"""gist_resources."""
