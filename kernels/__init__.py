"""rrhf_kernels: fused per-candidate length-normalised log-probabilities (see DESIGN.md contract)."""
