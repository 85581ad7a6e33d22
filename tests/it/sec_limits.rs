//! Security regression suite: sec_limits (see SECURITY.md).
