"""Leaf utilities, importing nothing of rrhf_lite above them: atomic file writes (io), the
user's files checked around third-party loaders (user_files), one dtype rule (precision),
process-group helpers (distributed), progress lines (console), report files and plots."""
