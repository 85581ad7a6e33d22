//! Security regression suite: sec_origins (see SECURITY.md).
