"""How a model's tensors are laid out, read by shard, quant and the runtime alike: the
architecture tables and tensor/pipeline-parallel split rules (plan), the manifest of a
sharded directory, the sources that read whole tensors from a checkpoint or a sharded
directory, and one rank's view of them (rank_tensors)."""
