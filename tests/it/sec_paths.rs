//! Security regression suite: sec_paths (see SECURITY.md).
