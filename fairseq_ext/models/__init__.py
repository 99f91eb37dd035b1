"""fairseq models of this plugin; fairseq_ext/__init__.py imports each one to register it."""
import logging

# Importing fairseq logs "Please install tensorboardX" through a stderr handler that its
# text_to_speech task installs at import time; this plugin's CLIs promise a single error
# line on stderr, so hush that one logger before the first fairseq import.
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)
