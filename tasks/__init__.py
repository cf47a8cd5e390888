"""SeqIO tasks of the GQA paper (importing this module registers them)."""
