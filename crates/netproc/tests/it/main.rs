//! Tests of the `netproc` command.

use std::process::Command;

#[test]
fn demo_exits_zero_and_shows_each_step() {
    let out = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("add(2, 3) = 5"), "{stdout}");
    assert!(stdout.contains("hello alice, the answer is 42"), "{stdout}");
    assert!(stdout.contains("\"state\":\"ok\""), "{stdout}");
    for code in [
        "tls_error",
        "authentication_failed",
        "insufficient_privileges",
    ] {
        assert!(stdout.contains(code), "{code} missing: {stdout}");
    }
    assert!(stdout.contains("all steps behaved as expected"), "{stdout}");
}

#[test]
fn unknown_command_exits_2_with_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_netproc"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
