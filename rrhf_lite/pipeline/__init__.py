"""`rrhf-lite run`: the run (run), its rounds (rounds), its directory (run_dir) and lock (lock),
and everything checked before a model loads (preflight)."""
