//! Liveness: online, unstable, offline on the server clock; heartbeats and
//! their clamping below the idle timeout.

use std::sync::Arc;
use std::time::Duration;

use netproc_auth::{ApiKeyStore, KeySpec};
use netproc_server::ServerOptions;
use netproc_wire::ErrorCode;

use crate::support::*;

#[tokio::test]
async fn liveness_goes_online_unstable_offline_and_back_with_a_manual_clock() {
    use netproc_server::{Liveness, LivenessEvent};
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let clock = Arc::new(netproc_limits::ManualClock::new());
    let mut options = ServerOptions::default();
    options.session_controls.unstable_after_ms = 1_000;
    options.session_controls.offline_after_ms = 2_000;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .clock(Arc::clone(&clock) as Arc<dyn netproc_limits::Clock>)
        .start()
        .await
        .unwrap();
    let mut events = server.liveness_events();
    let mut next = async || -> (String, Liveness, Liveness) {
        let e: LivenessEvent = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no liveness event in 5 s")
            .unwrap();
        (e.principal, e.from, e.to)
    };
    let transition = |from, to| (info.id.clone(), from, to);

    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    assert_eq!(
        next().await,
        transition(Liveness::Offline, Liveness::Online)
    );
    assert_eq!(server.liveness(), [(info.id.clone(), Liveness::Online)]);

    clock.advance(Duration::from_millis(1_500));
    assert_eq!(
        next().await,
        transition(Liveness::Online, Liveness::Unstable)
    );
    let listed = &server.sessions()[0];
    assert_eq!(listed.liveness, Liveness::Unstable);
    assert_eq!(server.abuse_metrics().unstable_principal_count, 1);
    assert!(listed.idle_ms >= 1_500, "{listed:?}");

    clock.advance(Duration::from_millis(1_000));
    assert_eq!(
        next().await,
        transition(Liveness::Unstable, Liveness::Offline)
    );

    // Heard from again.
    assert_eq!(s.call::<i64>("add", (1, 1)).await.unwrap(), 2);
    assert_eq!(
        next().await,
        transition(Liveness::Offline, Liveness::Online)
    );

    // Its last session closes.
    server.close_sessions(
        &netproc_server::SessionSelector::Principal(info.id.clone()),
        ErrorCode::DisconnectedByAdmin,
    );
    assert_eq!(
        next().await,
        transition(Liveness::Online, Liveness::Offline)
    );
    assert!(server.liveness().is_empty());
}

#[test]
fn liveness_thresholds_must_be_ordered_below_the_idle_timeout() {
    let mut o = ServerOptions::default();
    o.session_controls.unstable_after_ms = 700_000;
    let err = o.validate().unwrap_err();
    assert_eq!(err.field, "session_controls.unstable_after_ms");
    let mut o = ServerOptions::default();
    o.session_controls.idle_timeout_ms = 600_000;
    let err = o.validate().unwrap_err();
    assert_eq!(err.field, "session_controls.offline_after_ms");
    ServerOptions::default().validate().unwrap();
}

#[tokio::test]
async fn heartbeats_keep_an_idle_client_s_session_and_are_clamped_below_the_idle_timeout() {
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let key = key(&keys, "invoke_functions");
    let mut options = ServerOptions::default();
    options.session_controls.idle_timeout_ms = 400;
    options.session_controls.unstable_after_ms = 100;
    options.session_controls.offline_after_ms = 200;
    let server = start_with(&pki, keys, options).await;
    let with = |heartbeat| only(endpoint(&pki, &server, &key).heartbeat_interval(heartbeat));
    // Configured far above the idle timeout: clamped to half of it.
    let beating = with(Some(Duration::from_secs(10)));
    let silent = with(None);
    let (beating_session, _) = beating.session().await.unwrap();
    let (silent_session, _) = silent.session().await.unwrap();
    // Nothing to await here: the point is what does not happen in 3 idle
    // timeouts.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(beating.session().await.unwrap().0, beating_session);
    assert_ne!(
        silent.session().await.unwrap().0,
        silent_session,
        "a client without heartbeats was idled out and reconnected"
    );
}

/// Online at authentication (counts too), transitions at the configured
/// thresholds within a scan period, and no state skipped on the way down.
#[tokio::test]
async fn liveness_follows_short_thresholds_from_the_moment_of_auth() {
    use netproc_server::{Liveness, LivenessEvent};
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (info, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let mut options = ServerOptions::default();
    options.session_controls.unstable_after_ms = 300;
    options.session_controls.offline_after_ms = 600;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .start()
        .await
        .unwrap();
    let mut events = server.liveness_events();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    let authed = std::time::Instant::now();
    // No wait: online, and counted, as soon as the client is told AuthOk.
    assert_eq!(server.liveness(), [(info.id.clone(), Liveness::Online)]);
    assert_eq!(server.abuse_metrics().online_principal_count, 1);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e: LivenessEvent = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no liveness event in 5 s")
            .unwrap();
        seen.push((e.from, e.to, authed.elapsed()));
    }
    assert_eq!(
        seen.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
        [
            (Liveness::Offline, Liveness::Online),
            (Liveness::Online, Liveness::Unstable),
            (Liveness::Unstable, Liveness::Offline),
        ]
    );
    // The scan period is 75 ms here: allow it and some scheduling.
    let (unstable_at, offline_at) = (seen[1].2, seen[2].2);
    assert!(unstable_at >= Duration::from_millis(290), "{unstable_at:?}");
    assert!(
        unstable_at < Duration::from_millis(300 + 75 + 250),
        "{unstable_at:?}"
    );
    assert!(offline_at >= Duration::from_millis(590), "{offline_at:?}");
    assert!(
        offline_at < Duration::from_millis(600 + 75 + 250),
        "{offline_at:?}"
    );
}

#[tokio::test]
async fn a_principal_found_past_offline_goes_through_unstable() {
    use netproc_server::{Liveness, LivenessEvent};
    let pki = Pki::new();
    let keys = Arc::new(ApiKeyStore::in_memory());
    let (_, key) = keys
        .create(KeySpec::new("invoke_functions".parse().unwrap()))
        .unwrap();
    let clock = Arc::new(netproc_limits::ManualClock::new());
    let mut options = ServerOptions::default();
    options.session_controls.unstable_after_ms = 1_000;
    options.session_controls.offline_after_ms = 2_000;
    let server = builder(&pki, "s1", keys)
        .options(options)
        .clock(Arc::clone(&clock) as Arc<dyn netproc_limits::Clock>)
        .start()
        .await
        .unwrap();
    let mut events = server.liveness_events();
    let s = client(&pki, &server, &key).server("s1").unwrap();
    s.session().await.unwrap();
    // Past both thresholds between two scans.
    clock.advance(Duration::from_millis(5_000));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e: LivenessEvent = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("no liveness event in 5 s")
            .unwrap();
        seen.push((e.from, e.to));
    }
    assert_eq!(
        seen,
        [
            (Liveness::Offline, Liveness::Online),
            (Liveness::Online, Liveness::Unstable),
            (Liveness::Unstable, Liveness::Offline),
        ]
    );
}
