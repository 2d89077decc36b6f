"""What llmkit knows about model families, from names, shapes and config.json alone: the
family table (family), the shapes a config implies (shapes) and the tensor/pipeline-parallel
split rules (plan). Nothing here reads a tensor; checkpoint/ and everything above read this."""
