//! Security regression suite: sec_headers (see SECURITY.md).
