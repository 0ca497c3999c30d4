"""Listwise data: reading and validating rows (listwise), prompt files (prompts), prompts and
candidates as token ids (tokenization), how many candidates each prompt really has
(candidate_stats)."""
