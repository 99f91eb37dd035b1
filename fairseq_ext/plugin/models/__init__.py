"""Models: the registered ``bert`` model, building models from configs, model folders and their import."""
