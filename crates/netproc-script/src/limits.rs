//! Sandbox limits.

/// Limits applied to every script call, with safe defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScriptLimits {
    /// Operations per call (`script_error`, kind `operations_exceeded`). Default 1 000 000.
    pub max_operations: u64,
    /// Function call depth (`stack_overflow`). Default 64.
    pub max_call_depth: usize,
    /// Expression nesting depth. Default 64.
    pub max_expr_depth: usize,
    /// Bytes in one string (`too_large`). Default 1 MiB.
    pub max_string_bytes: usize,
    /// Elements in one array (`too_large`). Default 100 000.
    pub max_array_len: usize,
    /// Entries in one map (`too_large`). Default 100 000.
    pub max_map_len: usize,
    /// Modules imported by one call. Default 16.
    pub max_imports: usize,
    /// Wall-clock limit per call, ms (`timeout`). Default 1000. It counts
    /// from when a worker starts running the call: time waiting in the
    /// queue is bounded by the caller's deadline (and the bounded queue),
    /// not by this limit.
    pub wall_clock_ms: u64,
    /// Lines `print` and `debug` may log per call (together). Default 100.
    /// Past this or `max_output_bytes` the rest of the call's output is
    /// dropped, with one `output truncated` line.
    pub max_output_lines: usize,
    /// Bytes `print` and `debug` may log per call (together, after
    /// escaping). Default 16 KiB.
    pub max_output_bytes: usize,
    /// The clock, the cancel flag and the deadline are checked every this
    /// many operations. Default 1024.
    pub check_every_operations: u64,
    /// Stack of each worker thread. Default 8 MiB (Rhai recursion in debug
    /// builds needs it).
    pub worker_stack_bytes: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            max_operations: 1_000_000,
            max_call_depth: 64,
            max_expr_depth: 64,
            max_string_bytes: 1024 * 1024,
            max_array_len: 100_000,
            max_map_len: 100_000,
            max_imports: 16,
            wall_clock_ms: 1000,
            max_output_lines: 100,
            max_output_bytes: 16 * 1024,
            check_every_operations: 1024,
            worker_stack_bytes: 8 * 1024 * 1024,
        }
    }
}
