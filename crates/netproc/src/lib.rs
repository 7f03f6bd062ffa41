//! netproc
