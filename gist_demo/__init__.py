"""The embedded default: a synthetic pool and targets, a tiny pretrained model, and the SmolLM2 preset."""
