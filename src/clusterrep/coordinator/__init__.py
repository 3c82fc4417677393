"""The coordinator service: serial metadata execution, gseq, write tokens."""
