"""The recipe: its schema in typed sections (sections), the ablation entries (ablations), strict
YAML loading (yaml_strict), and the whole Recipe with --set overrides (recipe)."""
