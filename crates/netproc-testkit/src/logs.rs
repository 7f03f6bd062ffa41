//! Capturing the `tracing` output of a test binary.

use std::sync::{Mutex, OnceLock, PoisonError};

/// One global subscriber for the whole test binary, writing every event up
/// to `max_level` into a buffer the tests read; the first call installs it
/// (and fixes the level), later calls return the same buffer. Tests share
/// it: each filters the lines it caused.
///
/// A thread-local `set_default` is unreliable here: callsite interest can
/// be cached by a concurrent test while no subscriber is set.
pub fn log_capture(max_level: tracing::Level) -> &'static Mutex<Vec<u8>> {
    #[derive(Clone)]
    struct Capture(&'static Mutex<Vec<u8>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static BUF: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let writer = Capture(buf);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(max_level)
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        buf
    })
}
