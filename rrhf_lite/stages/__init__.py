"""Pipeline stages: sample, score, train, evaluate, merge, generate. Each reads and writes plain files."""
