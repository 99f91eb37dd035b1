"""Criterions: the registered ``glue_prediction`` criterion."""
