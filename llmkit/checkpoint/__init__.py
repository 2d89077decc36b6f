"""Open, inspect and write Hugging Face checkpoint directories."""
