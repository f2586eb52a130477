//! The state machine driven by hand: virtual time, no sockets.

use super::*;
use shared::oci;
use shared::proto::{Emulation, Heartbeat, Held};
use shared::provenance;

fn p(s: &str) -> Platform {
    s.parse().unwrap()
}

fn digest(n: u8) -> Digest {
    Digest::of(&[n])
}

pub(super) fn info(native: &[&str], emulated: &[&str], labels: &[(&str, &str)]) -> AgentInfo {
    AgentInfo {
        native: native.iter().map(|s| p(s)).collect(),
        emulated: emulated.iter().map(|s| p(s)).collect(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        capacity: 1,
        builder: "buildah".into(),
        builder_version: "1.28.2".into(),
        farm_version: "0.1.0".into(),
        memory_limit: None,
        allowed: vec![],
    }
}

pub(crate) fn spec(platforms: &[&str]) -> BuildSpec {
    BuildSpec {
        platforms: platforms.iter().map(|s| p(s)).collect(),
        tags: vec!["127.0.0.1:5000/hello:1".into()],
        dockerfile: "Dockerfile".into(),
        build_args: vec![],
        target: None,
        no_cache: false,
        emulation: Emulation::Fallback,
        require: BTreeMap::new(),
        context: digest(0),
        insecure_registries: vec!["127.0.0.1:5000".into()],
        credentials: None,
        secrets: vec![],
        entitlements: vec![],
        annotations: vec![],
        labels: vec![],
        ssh: vec![],
        inputs: Default::default(),
        notify: vec![],
        sign: false,
        // Off here: the tests below compare index bytes; provenance has its own tests.
        provenance: shared::proto::ProvenanceMode::Off,
        cache_to: None,
        cache_from: vec![],
    }
}

/// Drains actions: assignments as (conn, task, attempt, emulated), events, stitches.
#[derive(Default, Debug)]
struct Out {
    assigned: Vec<(ConnId, TaskId, u32, Platform, bool)>,
    cancelled: Vec<(ConnId, TaskId)>,
    events: Vec<BuildEvent>,
    stitched: Vec<Vec<u8>>,
    closed: Vec<ConnId>,
    refused: Vec<ConnId>,
    checks: Vec<(TaskId, Digest)>,
}

fn drain(core: &mut Core) -> Out {
    let mut out = Out::default();
    while let Some(a) = core.poll_action() {
        match a {
            Action::Send { conn, msg: CoordMsg::Assign(a) } => {
                out.assigned.push((conn, a.task, a.attempt, a.platform, a.emulated))
            }
            Action::Send { conn, msg: CoordMsg::Cancel { task, .. } } => out.cancelled.push((conn, task)),
            Action::Send { .. } => {}
            Action::Emit { event, .. } => out.events.push(event),
            Action::Stitch { index, .. } => out.stitched.push(index),
            Action::Close { conn, .. } => out.closed.push(conn),
            Action::Refuse { conn, .. } => out.refused.push(conn),
            Action::CheckCached { task, digest, .. } => out.checks.push((task, digest)),
        }
    }
    out
}

fn manifest(n: u8) -> ManifestRef {
    ManifestRef { media_type: oci::OCI_MANIFEST.into(), digest: digest(n), size: 100 + n as u64 }
}

fn three_agent_farm() -> Core {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "x86", 1, "a".into(), info(&["linux/amd64", "linux/386"], &["linux/arm64", "linux/arm/v7"], &[]))
        .unwrap();
    core.agent_up(0, "pi64", 2, "b".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.agent_up(0, "pi32", 3, "c".into(), info(&["linux/arm/v7"], &[], &[])).unwrap();
    drain(&mut core);
    core
}

#[test]
fn a_build_runs_each_platform_on_its_native_agent_and_stitches_in_the_order_asked() {
    let mut core = three_agent_farm();
    core.submit(10, "b1", "admin", spec(&["linux/arm/v7", "linux/amd64", "linux/arm64"]), None).unwrap();
    let out = drain(&mut core);
    let placed: Vec<(ConnId, String, bool)> =
        out.assigned.iter().map(|(c, _, _, p, e)| (*c, p.to_string(), *e)).collect();
    assert_eq!(
        placed,
        [(3, "linux/arm/v7".into(), false), (1, "linux/amd64".into(), false), (2, "linux/arm64".into(), false)]
    );
    // Results arrive in another order; the index keeps the user's.
    for (i, (conn, task, attempt, _, _)) in out.assigned.iter().enumerate().rev() {
        let agent = ["x86", "pi64", "pi32"][*conn as usize - 1];
        core.agent_msg(
            20,
            agent,
            *conn,
            AgentMsg::TaskDone { task: *task, attempt: *attempt, manifest: manifest(i as u8), timings: vec![] },
        );
    }
    let out = drain(&mut core);
    assert_eq!(out.stitched.len(), 1);
    let index = oci::parse_index(&out.stitched[0]).unwrap();
    let order: Vec<String> = index.iter().map(|d| d.platform.clone().unwrap().architecture).collect();
    assert_eq!(order, ["arm", "amd64", "arm64"]);
    assert_eq!(index[0].platform.as_ref().unwrap().variant.as_deref(), Some("v7"));
    assert_eq!(index[0].digest, digest(0));
    core.stitched("b1", Ok(Digest::of(&out.stitched[0])), 0);
    let out = drain(&mut core);
    assert!(matches!(&out.events[..], [BuildEvent::Succeeded { platforms, .. }] if platforms.len() == 3));
}

#[test]
fn without_its_native_agent_a_platform_is_emulated_and_with_emulation_never_it_waits() {
    let mut core = three_agent_farm();
    assert!(core.agent_down(5, "pi32", 3));
    drain(&mut core);
    core.submit(10, "b1", "admin", spec(&["linux/arm/v7"]), None).unwrap();
    let out = drain(&mut core);
    assert_eq!(out.assigned[0].0, 1);
    assert!(out.assigned[0].4, "emulated");
    assert!(matches!(&out.events[0], BuildEvent::Started { agent, emulated: true, .. } if agent == "x86"));

    let mut never = spec(&["linux/arm/v7"]);
    never.emulation = Emulation::Never;
    core.submit(11, "b2", "admin", never, None).unwrap();
    let out = drain(&mut core);
    assert!(out.assigned.is_empty());
    assert!(
        matches!(&out.events[..], [BuildEvent::Waiting { reason, .. }] if reason.contains("runs linux/arm/v7 natively")),
        "{:?}",
        out.events
    );
    // The native agent returns: the waiting task goes to it.
    core.agent_up(20, "pi32", 4, "c".into(), info(&["linux/arm/v7"], &[], &[])).unwrap();
    let out = drain(&mut core);
    assert_eq!(out.assigned.len(), 1);
    assert_eq!((out.assigned[0].0, out.assigned[0].4), (4, false));
}

#[test]
fn a_busy_native_agent_queues_the_task_and_the_waiting_reason_is_told_once() {
    let mut core = three_agent_farm();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    core.submit(0, "b2", "admin", spec(&["linux/arm64"]), None).unwrap();
    let out = drain(&mut core);
    assert_eq!(out.assigned.len(), 1);
    assert_eq!(out.events.iter().filter(|e| matches!(e, BuildEvent::Waiting { .. })).count(), 1);
    core.agent_msg(1, "pi64", 2, AgentMsg::Heartbeat(Heartbeat { busy: 1 }));
    core.handle_timeout(2);
    assert!(drain(&mut core).events.is_empty(), "no repeated waiting event");
    let (_, task, attempt, _, _) = out.assigned[0].clone();
    core.agent_msg(3, "pi64", 2, AgentMsg::TaskDone { task, attempt, manifest: manifest(1), timings: vec![] });
    let out = drain(&mut core);
    assert_eq!(out.assigned.len(), 1, "b2 runs once the slot frees: {out:?}");
    assert_eq!(out.assigned[0].0, 2);
}

#[test]
fn required_labels_pick_the_labelled_agent() {
    let mut core = three_agent_farm();
    core.agent_up(0, "jetson", 9, "j".into(), info(&["linux/arm64"], &[], &[("gpu", "nvidia")])).unwrap();
    drain(&mut core);
    let mut s = spec(&["linux/arm64"]);
    s.require.insert("gpu".into(), "nvidia".into());
    core.submit(0, "b1", "admin", s, None).unwrap();
    assert_eq!(drain(&mut core).assigned[0].0, 9);
}

#[test]
fn a_failed_platform_fails_the_build_cancels_the_others_and_pushes_nothing() {
    let mut core = three_agent_farm();
    core.submit(0, "b1", "admin", spec(&["linux/amd64", "linux/arm64"]), None).unwrap();
    let out = drain(&mut core);
    let (_, t_amd, a_amd, _, _) = out.assigned[0].clone();
    for line in ["STEP 2/2: RUN false", "error building at STEP \"RUN false\": exit status 1"] {
        core.agent_msg(1, "x86", 1, AgentMsg::TaskLog { task: t_amd, attempt: a_amd, line: line.into() });
    }
    core.agent_msg(
        2,
        "x86",
        1,
        AgentMsg::TaskFailed { task: t_amd, attempt: a_amd, error: "buildah exited with 1".into() },
    );
    let out = drain(&mut core);
    assert!(out.stitched.is_empty());
    assert_eq!(out.cancelled.len(), 1, "the arm64 task is cancelled on its agent");
    assert_eq!(out.cancelled[0].0, 2);
    assert!(out.events.iter().any(|e| matches!(e,
        BuildEvent::PlatformFailed { platform, last_lines, .. } if platform.to_string() == "linux/amd64" && last_lines.len() == 2)));
    assert!(out.events.iter().any(|e| matches!(e,
        BuildEvent::Failed { error } if error == "linux/amd64 failed: buildah exited with 1")));
}

#[test]
fn a_lost_agent_s_task_is_retried_elsewhere_and_its_late_result_is_refused() {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.agent_up(0, "b", 2, "b".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    drain(&mut core);
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    let first = drain(&mut core).assigned[0].clone();
    let (lost_conn, task, attempt, _, _) = first;
    let lost = if lost_conn == 1 { "a" } else { "b" };
    let other = if lost_conn == 1 { "b" } else { "a" };
    // The other agent keeps beating; the first goes silent past the timeout.
    core.agent_msg(10_000, other, 3 - lost_conn, AgentMsg::Heartbeat(Heartbeat { busy: 0 }));
    assert_eq!(core.poll_timeout(), Some(15_000));
    core.handle_timeout(15_000);
    let out = drain(&mut core);
    assert!(out.closed.contains(&lost_conn));
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, BuildEvent::Retrying { reason, .. } if reason.contains("attempt 2 of 3"))));
    let (conn2, task2, attempt2, _, _) = out.assigned[0].clone();
    assert_eq!((conn2, task2, attempt2), (3 - lost_conn, task, attempt + 1));
    // The presumed-dead agent comes back and reports its stale attempt: refused, no stitch.
    core.agent_up(16_000, lost, 7, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    drain(&mut core);
    for _ in 0..1000 {
        core.agent_msg(16_001, lost, 7, AgentMsg::TaskDone { task, attempt, manifest: manifest(9), timings: vec![] });
    }
    let out = drain(&mut core);
    assert!(out.stitched.is_empty() && out.events.is_empty(), "{out:?}");
    core.agent_msg(
        17_000,
        other,
        conn2,
        AgentMsg::TaskDone { task, attempt: attempt2, manifest: manifest(2), timings: vec![] },
    );
    let out = drain(&mut core);
    let index = oci::parse_index(&out.stitched[0]).unwrap();
    assert_eq!(index[0].digest, digest(2));
}

#[test]
fn too_many_lost_attempts_fail_the_build() {
    let mut core = Core::new(1_000, 2);
    core.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    drain(&mut core);
    core.handle_timeout(1_000);
    drain(&mut core);
    core.agent_up(1_500, "a", 2, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    assert_eq!(drain(&mut core).assigned[0].2, 2);
    core.handle_timeout(2_500);
    let out = drain(&mut core);
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, BuildEvent::Failed { error } if error.contains("gave up after 2 attempts"))));
}

#[test]
fn bad_submissions_are_refused_with_the_fix() {
    let mut core = three_agent_farm();
    assert_eq!(core.submit(0, "b", "admin", spec(&[]), None), Err(SubmitError::NoPlatforms));
    let mut s = spec(&["linux/amd64"]);
    s.tags.push("127.0.0.1:5000/other:1".into());
    assert!(matches!(core.submit(0, "b", "admin", s, None), Err(SubmitError::MixedRepositories(..))));
    let mut s = spec(&["linux/amd64"]);
    s.tags = vec!["Bad Tag".into()];
    assert!(matches!(core.submit(0, "b", "admin", s, None), Err(SubmitError::BadTag(_))));
    // A digest in a tag is refused before any task is queued (a client that skips the CLI's check).
    let digest = format!("sha256:{}", "a".repeat(64));
    for tag in [format!("127.0.0.1:5000/app:1@{digest}"), format!("127.0.0.1:5000/app@{digest}")] {
        let mut s = spec(&["linux/amd64"]);
        s.tags = vec![tag.clone()];
        let err = core.submit(0, "b", "admin", s, None).unwrap_err();
        assert_eq!(err, SubmitError::BadTag(shared::oci::push_tag(&tag).unwrap_err().to_string()), "{tag}");
    }
    assert!(!core.builds.contains_key("b"), "a refused build is not kept");
}

/// Commits what the core changed into a real store, as the driver does.
fn persist(core: &mut Core, store: &crate::store::Store) {
    store.commit(&core.take_batch()).unwrap();
}

fn restart(store: &crate::store::Store, now: u64) -> Core {
    let mut core = Core::new(15_000, 3);
    core.recover(now, store.load().unwrap());
    core
}

#[test]
fn a_restarted_coordinator_keeps_queued_tasks_and_lets_agents_confirm_running_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "pi64", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    let mut s = spec(&["linux/arm64", "linux/riscv64"]);
    s.credentials = Some(Credentials { username: "bob".into(), password: "hunter2".into() });
    core.submit(0, "b1", "admin", s, None).unwrap();
    let (_, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    persist(&mut core, &store);
    // The password never reaches the store.
    drop(store);
    let bytes = std::fs::read(dir.path().join(crate::store::FILE_NAME)).unwrap();
    assert!(!bytes.windows(7).any(|w| w == b"hunter2"), "credentials written to the state file");
    let store = crate::store::Store::open(dir.path()).unwrap();

    let mut core = restart(&store, 100_000);
    let builds = core.builds(10);
    assert_eq!(builds[0].state, "running");
    assert_eq!(builds[0].platforms[0].state, "running");
    assert_eq!(builds[0].platforms[1].state, "queued");
    // The agent returns and says it still holds the task: it carries on, same attempt.
    core.agent_up(101_000, "pi64", 5, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.agent_msg(101_001, "pi64", 5, AgentMsg::Holding(vec![Held { task, attempt }]));
    let out = drain(&mut core);
    assert!(out.assigned.is_empty() && out.cancelled.is_empty(), "{out:?}");
    // Past the grace period the confirmed task is still its.
    core.agent_msg(110_000, "pi64", 5, AgentMsg::Heartbeat(shared::proto::Heartbeat { busy: 1 }));
    core.handle_timeout(120_000);
    assert!(drain(&mut core).events.is_empty());
    core.agent_msg(120_001, "pi64", 5, AgentMsg::TaskDone { task, attempt, manifest: manifest(1), timings: vec![] });
    let out = drain(&mut core);
    assert!(out.events.iter().any(|e| matches!(e, BuildEvent::PlatformDone(_))), "{out:?}");
}

#[test]
fn running_tasks_nobody_confirms_are_requeued_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    drain(&mut core);
    persist(&mut core, &store);
    let mut core = restart(&store, 50_000);
    assert_eq!(core.poll_timeout(), Some(65_000));
    core.handle_timeout(64_999);
    assert!(drain(&mut core).events.is_empty());
    // Another agent is there; the old one never comes back.
    core.agent_up(60_000, "b", 2, "b".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    drain(&mut core);
    core.handle_timeout(65_000);
    let out = drain(&mut core);
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, BuildEvent::Retrying { reason, .. } if reason.contains("did not confirm"))));
    assert_eq!((out.assigned[0].0, out.assigned[0].2), (2, 2));
}

#[test]
fn an_agent_that_comes_back_without_its_task_loses_it_and_stale_holdings_are_cancelled() {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (_, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    // Reconnects (new connection) having restarted, once its old connection has gone quiet: it
    // holds nothing, but claims an old task.
    let quiet = core.fleet.alive_ms();
    core.agent_up(quiet, "a", 2, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.agent_msg(quiet + 1, "a", 2, AgentMsg::Holding(vec![Held { task: 999, attempt: 1 }]));
    let out = drain(&mut core);
    assert_eq!(out.cancelled, vec![(2, 999)]);
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, BuildEvent::Retrying { reason, .. } if reason.contains("came back without it"))));
    assert_eq!((out.assigned[0].1, out.assigned[0].2), (task, attempt + 1));
}

#[test]
fn cancel_stops_running_tasks_on_their_agents_and_ends_the_build() {
    let mut core = three_agent_farm();
    core.submit(0, "b1", "admin", spec(&["linux/amd64", "linux/arm64"]), None).unwrap();
    drain(&mut core);
    core.cancel(5, "b1").unwrap();
    let out = drain(&mut core);
    assert_eq!(out.cancelled.len(), 2);
    assert!(matches!(out.events.last(), Some(BuildEvent::Cancelled)));
    assert!(out.stitched.is_empty());
    assert!(core.cancel(6, "b1").unwrap_err().contains("already ended (cancelled)"));
    assert!(core.cancel(6, "nope").unwrap_err().contains("no build nope"));
    assert_eq!(core.builds(1)[0].state, "cancelled");
}

#[test]
fn a_draining_agent_gets_no_new_work_and_released_tasks_run_elsewhere() {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (_, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    core.agent_msg(1, "a", 1, AgentMsg::Draining);
    core.submit(2, "b2", "admin", spec(&["linux/arm64"]), None).unwrap();
    let out = drain(&mut core);
    assert!(out.assigned.is_empty(), "a draining agent takes no new task");
    assert_eq!(core.agents()[0].state, shared::proto::AgentState::Draining);
    let mut two_slots = info(&["linux/arm64"], &[], &[]);
    two_slots.capacity = 2;
    core.agent_up(3, "b", 2, "b".into(), two_slots).unwrap();
    assert_eq!(drain(&mut core).assigned.len(), 1, "b2 goes to b");
    core.agent_msg(4, "a", 1, AgentMsg::Release { task, attempt });
    let out = drain(&mut core);
    assert!(out.assigned.iter().any(|a| a.0 == 2 && a.1 == task && a.2 == attempt + 1), "{out:?}");
}

#[test]
fn a_second_agent_with_a_live_identity_is_refused_and_the_first_keeps_its_task() {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "a", 1, "10.0.0.1:5000".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (_, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    core.agent_msg(3_000, "a", 1, AgentMsg::Heartbeat(Heartbeat { busy: 1 }));
    let refused = core.agent_up(4_000, "a", 2, "10.0.0.2:6000".into(), info(&["linux/arm64"], &[], &[]));
    let reason = refused.unwrap_err();
    assert!(reason.starts_with("agent identity \"a\" is already connected from 10.0.0.1:5000 and answering heartbeats"));
    let mut told = vec![];
    while let Some(a) = core.poll_action() {
        match a {
            Action::Refuse { conn, reason: r } => told.push((conn, r)),
            Action::Send { conn, msg: CoordMsg::Duplicate { address } } => told.push((conn, address)),
            other => panic!("nothing else happens: {other:?}"),
        }
    }
    assert_eq!(told, vec![(2, reason), (1, "10.0.0.2:6000".to_string())]);
    // The first keeps the task: its result counts.
    core.agent_msg(5_000, "a", 1, AgentMsg::TaskDone { task, attempt, manifest: manifest(1), timings: vec![] });
    assert_eq!(drain(&mut core).stitched.len(), 1);
    assert_eq!(core.agents()[0].conflict.as_ref().map(|c| c.address.as_str()), Some("10.0.0.2:6000"));
}

#[test]
fn an_agent_without_disk_space_hands_its_task_on_or_fails_it_when_nobody_else_can() {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.agent_up(0, "b", 2, "b".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (conn, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    let (full, other) = if conn == 1 { ("a", 2) } else { ("b", 1) };
    let error = format!("agent {full} is out of disk space in its work directory /w (3 MB free)");
    core.agent_msg(1, full, conn, AgentMsg::Unfit { task, attempt, error: error.clone() });
    let out = drain(&mut core);
    assert_eq!((out.assigned[0].0, out.assigned[0].1, out.assigned[0].2), (other, task, attempt + 1));
    let retry = format!("agent {full} cannot run it: {error}; retrying (attempt 2 of 3)");
    assert!(out.events.iter().any(|e| matches!(e, BuildEvent::Retrying { reason, .. } if *reason == retry)), "{out:?}");

    // A busy agent can take it later: b2's task waits for it rather than going back to the full one.
    core.submit(2, "b2", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (conn2, task2, attempt2, _, _) = drain(&mut core).assigned[0].clone();
    assert_eq!(conn2, conn, "the other agent is busy with b1");
    core.agent_msg(3, full, conn, AgentMsg::Unfit { task: task2, attempt: attempt2, error: error.clone() });
    assert!(drain(&mut core).assigned.is_empty(), "not to the agent whose disk is full");

    // Nobody else could take it: the task fails at once with the agent's message.
    let mut alone = Core::new(15_000, 3);
    alone.agent_up(0, "a", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    alone.submit(0, "b3", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (_, task, attempt, _, _) = drain(&mut alone).assigned[0].clone();
    alone.agent_msg(1, "a", 1, AgentMsg::Unfit { task, attempt, error: error.clone() });
    let out = drain(&mut alone);
    assert!(out.assigned.is_empty());
    let failed = format!("linux/arm64 failed: {error}");
    assert!(out.events.iter().any(|e| matches!(e, BuildEvent::Failed { error } if *error == failed)), "{out:?}");
}

#[test]
fn limits_refuse_oversized_builds_naming_the_limit_and_its_key() {
    let mut core = three_agent_farm().with_limits(Limits {
        max_builds_per_client: 1,
        max_platforms_per_build: 2,
        ..Limits::default()
    });
    let err = core.submit(0, "b", "admin", spec(&["linux/amd64", "linux/arm64", "linux/arm/v7"]), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the number of platforms is 3, over the limit of 2 (config key max_platforms_per_build)"
    );
    core.submit(0, "b1", "admin", spec(&["linux/amd64"]), None).unwrap();
    let err = core.submit(0, "b2", "admin", spec(&["linux/amd64"]), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the number of builds admin has running is 2, over the limit of 1 (config key max_builds_per_client)"
    );
    let mut s = spec(&["linux/amd64"]);
    s.build_args = vec![("K".into(), "v".repeat(70_000))];
    let err = three_agent_farm().submit(0, "b", "admin", s, None).unwrap_err();
    assert!(err.to_string().contains("(config key max_build_arg_bytes)"), "{err}");
}

#[test]
fn identical_inputs_are_answered_from_the_cache_once_the_registry_confirms_and_a_moved_base_misses() {
    let mut core = three_agent_farm();
    let bases = || Some(vec![("reg/busybox:latest".to_string(), digest(7))]);
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), bases()).unwrap();
    let (conn, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    core.agent_msg(1, "pi64", conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(3), timings: vec![] });
    core.stitched("b1", Ok(digest(99)), 0);
    drain(&mut core);

    // Same inputs: no agent, a registry check, then `cached`.
    core.submit(2, "b2", "admin", spec(&["linux/arm64"]), bases()).unwrap();
    let out = drain(&mut core);
    assert!(out.assigned.is_empty());
    let (t2, d) = out.checks[0].clone();
    assert_eq!(d, digest(3));
    core.cache_checked(3, t2, true);
    let out = drain(&mut core);
    assert!(matches!(&out.events[0], BuildEvent::PlatformDone(r) if r.cached && r.manifest.digest == digest(3)));
    assert_eq!(oci::parse_index(&out.stitched[0]).unwrap()[0].digest, digest(3));

    // The registry lost it: built again.
    core.submit(4, "b3", "admin", spec(&["linux/arm64"]), bases()).unwrap();
    let (t3, _) = drain(&mut core).checks[0].clone();
    core.cache_checked(5, t3, false);
    assert_eq!(drain(&mut core).assigned.len(), 1);

    // A base tag that moved, --no-cache, or unresolved bases: no cache.
    let mut fresh = three_agent_farm();
    fresh.submit(0, "x", "admin", spec(&["linux/arm64"]), bases()).unwrap();
    let (conn, task, attempt, _, _) = drain(&mut fresh).assigned[0].clone();
    fresh.agent_msg(1, "pi64", conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(3), timings: vec![] });
    drain(&mut fresh);
    fresh
        .submit(2, "moved", "admin", spec(&["linux/arm64"]), Some(vec![("reg/busybox:latest".into(), digest(8))]))
        .unwrap();
    assert!(drain(&mut fresh).checks.is_empty());
    let mut nc = spec(&["linux/arm64"]);
    nc.no_cache = true;
    fresh.submit(3, "nocache", "admin", nc, bases()).unwrap();
    assert!(drain(&mut fresh).checks.is_empty());
    fresh.submit(4, "unresolved", "admin", spec(&["linux/arm64"]), None).unwrap();
    assert!(drain(&mut fresh).checks.is_empty());
}

#[test]
fn a_cached_result_answers_only_builds_whose_required_labels_an_agent_of_that_builder_has() {
    let mut core = three_agent_farm();
    let bases = || Some(vec![("reg/busybox:latest".to_string(), digest(7))]);
    core.submit(0, "b1", "admin", spec(&["linux/arm64"]), bases()).unwrap();
    let (conn, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    assert_eq!(conn, 2, "built by pi64 (buildah 1.28.2)");
    core.agent_msg(1, "pi64", conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(3), timings: vec![] });
    drain(&mut core);
    let mut jetson = info(&["linux/arm64"], &[], &[("builder", "docker")]);
    jetson.builder = "docker".into();
    jetson.builder_version = "20.10.24".into();
    core.agent_up(1, "jetson", 4, "d".into(), jetson).unwrap();
    drain(&mut core);
    // Requiring builder=docker: pi64's result is not that builder's; jetson builds it.
    let mut on_docker = spec(&["linux/arm64"]);
    on_docker.require.insert("builder".into(), "docker".into());
    core.submit(2, "b2", "admin", on_docker, bases()).unwrap();
    let out = drain(&mut core);
    assert!(out.checks.is_empty(), "{out:?}");
    assert_eq!(out.assigned.iter().map(|a| a.0).collect::<Vec<_>>(), [4]);
}

#[test]
fn only_the_newest_ended_builds_stay_in_memory_and_all_stay_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut core = three_agent_farm().with_ended_builds_kept(2);
    for (i, id) in ["b1", "b2", "b3", "b4"].into_iter().enumerate() {
        core.submit(i as u64, id, "admin", spec(&["linux/amd64"]), None).unwrap();
        drain(&mut core);
        persist(&mut core, &store);
        core.cancel(i as u64, id).unwrap();
        drain(&mut core);
        persist(&mut core, &store);
    }
    // A live build is never forgotten, however many end after it.
    core.submit(10, "live", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (conn, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
    persist(&mut core, &store);
    let listed: Vec<String> = core.builds(100).into_iter().map(|b| b.id).collect();
    assert_eq!(listed, ["live", "b4", "b3"]);
    assert!(core.build_state("b1").is_none() && core.build_state("b2").is_none());
    // Leaving memory deleted nothing: the store still has every build.
    for id in ["b1", "b2", "b3", "b4", "live"] {
        assert!(store.has_build(id).unwrap(), "{id} missing from the store");
    }
    // A restart keeps the same bound.
    let mut again = restart(&store, 20).with_ended_builds_kept(2);
    again.take_batch();
    let listed: Vec<String> = again.builds(100).into_iter().map(|b| b.id).collect();
    assert_eq!(listed, ["live", "b4", "b3"]);
    // The live build still finishes, and ending pushes the oldest kept one out.
    core.agent_msg(30, "pi64", conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(1), timings: vec![] });
    drain(&mut core);
    core.stitched("live", Ok(digest(9)), 1);
    drain(&mut core);
    persist(&mut core, &store);
    let listed: Vec<String> =
        core.builds(100).into_iter().map(|b| (b.id, b.state)).map(|(i, s)| format!("{i}:{s}")).collect();
    assert_eq!(listed, ["live:succeeded", "b4:cancelled"]);
    assert!(store.has_build("b3").unwrap());
}

#[test]
fn task_ids_of_a_new_run_never_meet_those_of_an_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut core = three_agent_farm();
    core.start_epoch(store.begin_epoch().unwrap());
    core.submit(0, "b1", "admin", spec(&["linux/amd64"]), None).unwrap();
    let (_, first, ..) = drain(&mut core).assigned[0].clone();
    assert_eq!(first, 1 << 40);
    // This run hands out another id but crashes before writing it down.
    core.submit(1, "b2", "admin", spec(&["linux/arm64"]), None).unwrap();
    let (_, unwritten, ..) = drain(&mut core).assigned[0].clone();
    let mut again = restart(&store, 2);
    again.start_epoch(store.begin_epoch().unwrap());
    again.agent_up(2, "x86", 9, "a".into(), info(&["linux/amd64"], &[], &[])).unwrap();
    again.submit(2, "b3", "admin", spec(&["linux/amd64"]), None).unwrap();
    let (_, next, ..) = drain(&mut again).assigned[0].clone();
    assert!(next > unwritten && next >= 2 << 40, "{next} reuses an id of the crashed run");
}

#[test]
fn a_build_is_queued_until_a_platform_reaches_an_agent_and_found_by_a_unique_prefix() {
    let mut core = Core::new(15_000, 3);
    core.submit(0, "b1aaaa", "alice", spec(&["linux/arm64"]), None).unwrap();
    core.submit(0, "b1bbbb", "alice", spec(&["linux/arm64"]), None).unwrap();
    assert_eq!(core.build_view("b1aaaa").unwrap().state, "queued");
    assert_eq!(core.builds_with_prefix("b1a"), ["b1aaaa"]);
    let mut both = core.builds_with_prefix("b1");
    both.sort();
    assert_eq!(both, ["b1aaaa", "b1bbbb"]);
    assert!(core.has_client("alice") && !core.has_client("bob"));
    core.agent_up(1, "pi64", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    drain(&mut core);
    let states: Vec<String> = core.builds(10).into_iter().map(|b| b.state).collect();
    assert!(states.contains(&"running".to_string()), "{states:?}");
}

#[test]
fn fastest_uses_the_recorded_durations_and_emulates_on_an_idle_agent_when_the_native_one_is_busy() {
    let mut core = Core::new(15_000, 3);
    core.agent_up(0, "x86", 1, "a".into(), info(&["linux/amd64"], &["linux/arm64"], &[])).unwrap();
    core.agent_up(0, "pi64", 2, "b".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    drain(&mut core);
    let arm = |n: &str, context: u8, emulation: Emulation| {
        let mut s = spec(&["linux/arm64"]);
        s.context = digest(context);
        s.emulation = emulation;
        s.no_cache = true;
        (n.to_string(), s)
    };
    let done = |core: &mut Core, now: u64, agent: &str, conn: ConnId, out: &Out| {
        let (_, task, attempt, _, _) = out.assigned[0];
        core.agent_msg(now, agent, conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(1), timings: vec![] });
        drain(core);
    };
    // The history: pi64 built context 0 natively in 9 min; x86 emulated it in 3m10s.
    let (id, s) = arm("b1", 0, Emulation::Fallback);
    core.submit(1_000, &id, "admin", s, None).unwrap();
    let out = drain(&mut core);
    assert_eq!(out.assigned[0].0, 2);
    done(&mut core, 541_000, "pi64", 2, &out);
    assert!(core.agent_down(541_000, "pi64", 2));
    let (id, s) = arm("b2", 0, Emulation::Fallback);
    core.submit(542_000, &id, "admin", s, None).unwrap();
    let out = drain(&mut core);
    assert_eq!((out.assigned[0].0, out.assigned[0].4), (1, true));
    done(&mut core, 732_000, "x86", 1, &out);
    core.agent_up(733_000, "pi64", 3, "b".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    drain(&mut core);
    // pi64 is busy with another context; fastest sends context 0 to the idle emulator and says why.
    let (id, s) = arm("b3", 7, Emulation::Fallback);
    core.submit(734_000, &id, "admin", s, None).unwrap();
    assert_eq!(drain(&mut core).assigned[0].0, 3);
    let (id, s) = arm("b4", 0, Emulation::Fastest);
    core.submit(735_000, &id, "admin", s, None).unwrap();
    let out = drain(&mut core);
    assert_eq!((out.assigned[0].0, out.assigned[0].4), (1, true), "{out:?}");
    let why = out.events.iter().find_map(|e| match e {
        BuildEvent::Log { line, .. } => Some(line.as_str()),
        _ => None,
    });
    assert_eq!(why, Some("farm: linux/arm64 → x86 (emulated): expected 3m10s vs pi64 (native, 1 running): 18m"));
    // The same build with the default placement waits for the native board.
    let (id, s) = arm("b5", 0, Emulation::Fallback);
    core.submit(736_000, &id, "admin", s, None).unwrap();
    let out = drain(&mut core);
    assert!(out.assigned.is_empty(), "{out:?}");
}

#[test]
fn annotations_reach_the_agent_and_the_index_and_labels_and_manifest_annotations_key_the_cache() {
    let anns = |list: &[&str]| -> Vec<shared::annotation::Annotation> {
        list.iter().flat_map(|s| shared::annotation::parse_annotation(s).unwrap()).collect()
    };
    let mut core = three_agent_farm();
    let mut s = spec(&["linux/amd64", "linux/arm64"]);
    s.annotations = anns(&[
        "index:org.opencontainers.image.source=https://example.test/app",
        "manifest[linux/arm64]:org.example.arm=yes",
        "manifest-descriptor[linux/amd64]:org.example.d=amd",
    ]);
    s.labels = vec![("org.example.team".into(), "farm".into())];
    core.submit(0, "b1", "admin", s.clone(), None).unwrap();
    let mut assignments = vec![];
    while let Some(a) = core.poll_action() {
        if let Action::Send { conn, msg: CoordMsg::Assign(a) } = a {
            assignments.push((conn, *a));
        }
    }
    let team = vec![("org.example.team".to_string(), "farm".to_string())];
    let platforms: Vec<String> = assignments.iter().map(|(_, a)| a.platform.to_string()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    assert_eq!(assignments[0].1.annotations, BTreeMap::new());
    assert_eq!(assignments[1].1.annotations, [("org.example.arm".to_string(), "yes".to_string())].into());
    assert!(assignments.iter().all(|(_, a)| a.labels == team));
    for (i, (conn, a)) in assignments.iter().enumerate() {
        let agent = ["x86", "pi64", "pi32"][*conn as usize - 1];
        let msg = AgentMsg::TaskDone { task: a.task, attempt: a.attempt, manifest: manifest(i as u8), timings: vec![] };
        core.agent_msg(1, agent, *conn, msg);
    }
    let out = drain(&mut core);
    // The index annotation on the index, the descriptor annotation on amd64's entry only.
    let mut expected: Vec<Descriptor> = (0..2u8)
        .map(|i| {
            let m = manifest(i);
            let mut d = Descriptor::new(&m.media_type, m.digest, m.size);
            d.platform = Some((&p(["linux/amd64", "linux/arm64"][i as usize])).into());
            d
        })
        .collect();
    expected[0].annotations.insert("org.example.d".into(), "amd".into());
    let source = [("org.opencontainers.image.source".to_string(), "https://example.test/app".to_string())].into();
    assert_eq!(out.stitched[0], oci::image_index_annotated(&expected, &source));
    // The CLI makes the same bytes from the results it is told of.
    let entries: Vec<(Platform, Descriptor)> = (0..2u8)
        .map(|i| {
            let m = manifest(i);
            (p(["linux/amd64", "linux/arm64"][i as usize]), Descriptor::new(&m.media_type, m.digest, m.size))
        })
        .collect();
    assert_eq!(shared::annotation::stitch(&entries, &s.annotations), out.stitched[0]);

    // The cache key: labels and the platform's own manifest annotations count, the rest not.
    let bases = [("reg/busybox:latest".to_string(), digest(7))];
    let key = |s: &BuildSpec, platform: &str| cache_key(s, &p(platform), &bases);
    let mut other_label = s.clone();
    other_label.labels = vec![("org.example.team".into(), "other".into())];
    assert_ne!(key(&s, "linux/amd64"), key(&other_label, "linux/amd64"));
    let mut arm_only = s.clone();
    arm_only.annotations = anns(&["manifest[linux/arm64]:org.example.arm=no"]);
    assert_eq!(key(&s, "linux/amd64"), key(&arm_only, "linux/amd64"));
    assert_ne!(key(&s, "linux/arm64"), key(&arm_only, "linux/arm64"));
}

#[test]
fn only_an_agent_running_a_task_of_a_build_may_use_its_ssh() {
    let mut core = three_agent_farm();
    core.submit(0, "b1", "admin", BuildSpec { ssh: vec!["default".into()], ..spec(&["linux/amd64"]) }, None).unwrap();
    let out = drain(&mut core);
    let (conn, task, attempt, _, _) = out.assigned[0].clone();
    assert_eq!(conn, 1);
    assert!(core.runs_task_of("x86", "b1"));
    assert!(!core.runs_task_of("pi64", "b1"), "another agent");
    assert!(!core.runs_task_of("x86", "b2"), "another build");
    core.agent_msg(1, "x86", 1, AgentMsg::TaskDone { task, attempt, manifest: manifest(1), timings: vec![] });
    drain(&mut core);
    assert!(!core.runs_task_of("x86", "b1"), "a finished task opens nothing");
}

#[test]
fn named_contexts_network_none_and_extra_hosts_are_in_the_cache_key_and_pull_is_not() {
    let amd64 = p("linux/amd64");
    let base = spec(&["linux/amd64"]);
    let key = |s: &BuildSpec| super::cache_key(s, &amd64, &[]);
    let mut named = base.clone();
    named.inputs.contexts.push(shared::proto::NamedContext { name: "extra".into(), context: digest(1) });
    let mut other = named.clone();
    other.inputs.contexts[0].context = digest(2);
    let mut none = base.clone();
    none.inputs.no_network = true;
    let mut hosts = base.clone();
    hosts.inputs.add_hosts.push(("db.internal".into(), "10.1.2.3".into()));
    let keys: std::collections::BTreeSet<String> = [&base, &named, &other, &none, &hosts].map(key).into();
    assert_eq!(keys.len(), 5, "each input changes the key");
    let mut pull = base.clone();
    pull.inputs.pull = true;
    assert_eq!(key(&pull), key(&base), "--pull re-resolves bases, whose digests are in the key already");
}

#[test]
fn a_signed_build_asks_the_driver_to_sign_its_index_and_one_without_tags_is_refused() {
    let mut core = three_agent_farm();
    let err = core.submit(0, "b0", "admin", BuildSpec { sign: true, tags: vec![], ..spec(&["linux/amd64"]) }, None);
    assert_eq!(
        err.unwrap_err().to_string(),
        "--sign signs the image in the registry it is pushed to, and this build pushes to none: push it (-t \
         REGISTRY/REPOSITORY:TAG) or drop --sign"
    );
    core.submit(0, "b1", "admin", BuildSpec { sign: true, ..spec(&["linux/amd64"]) }, None).unwrap();
    let out = drain(&mut core);
    let (conn, task, attempt, _, _) = out.assigned[0].clone();
    core.agent_msg(1, "x86", conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(0), timings: vec![] });
    let signs: Vec<bool> = std::iter::from_fn(|| core.poll_action())
        .filter_map(|a| match a {
            Action::Stitch { sign, .. } => Some(sign),
            _ => None,
        })
        .collect();
    assert_eq!(signs, [true]);
}

#[test]
fn provenance_names_agent_certificate_and_mode_and_a_cached_platform_keeps_its_makers() {
    let mut core = three_agent_farm();
    core.agent_certificate("x86", Some("sha256:c3r7".into()));
    let with = |tags: &[&str]| BuildSpec {
        provenance: shared::proto::ProvenanceMode::Min,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..spec(&["linux/amd64", "linux/arm64"])
    };
    let bases = vec![("127.0.0.1:5000/busybox:1".to_string(), digest(50))];
    let source =
        provenance::Source { dockerfile_digest: Some(digest(51)), dockerfile_text: None, bases: bases.clone() };
    // pi64 is away: arm64 is emulated on x86.
    core.agent_down(0, "pi64", 2);
    core.submit_with_source(
        1_000,
        "b1",
        "admin",
        with(&["127.0.0.1:5000/hello:1"]),
        Some(bases.clone()),
        source.clone(),
    )
    .unwrap();
    // x86 takes one task at a time: amd64 runs from 1 s to 61 s, then arm64 from 61 s to 61 s.
    let mut out = drain(&mut core);
    while out.stitched.is_empty() {
        assert!(!out.assigned.is_empty(), "{out:?}");
        for (conn, task, attempt, platform, _) in out.assigned.clone() {
            let m = manifest(if platform == p("linux/amd64") { 1 } else { 2 });
            core.agent_msg(61_000, "x86", conn, AgentMsg::TaskDone { task, attempt, manifest: m, timings: vec![] });
        }
        out = drain(&mut core);
    }
    let index: serde_json::Value = serde_json::from_slice(&out.stitched[0]).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{index}");
    assert_eq!(entries[2]["annotations"]["vnd.docker.reference.digest"], digest(1).as_str());
    assert_eq!(entries[3]["annotations"]["vnd.docker.reference.digest"], digest(2).as_str());
    let statements = core.statements("b1");
    assert_eq!(statements.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(), [digest(1), digest(2)]);
    let s: Vec<serde_json::Value> = statements.iter().map(|(_, s)| serde_json::from_slice(s).unwrap()).collect();
    for (s, (emulated, started)) in s.iter().zip([(false, "1970-01-01T00:00:01Z"), (true, "1970-01-01T00:01:01Z")]) {
        let p = &s["predicate"];
        assert_eq!(p["runDetails"]["builder"]["id"], "farm://coordinator/agents/x86");
        assert_eq!(p["runDetails"]["metadata"]["invocationId"], "b1");
        assert_eq!(p["runDetails"]["metadata"]["startedOn"], started);
        assert_eq!(p["runDetails"]["metadata"]["finishedOn"], "1970-01-01T00:01:01Z");
        assert_eq!(p["buildDefinition"]["internalParameters"]["agent"]["certificateSha256"], "sha256:c3r7");
        assert_eq!(p["buildDefinition"]["internalParameters"]["emulated"], emulated);
        assert_eq!(p["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"], digest(50).hex());
    }
    core.stitched("b1", Ok(Digest::of(&out.stitched[0])), 0);
    drain(&mut core);

    // The same inputs under another tag: cached, with the statements of b1.
    core.submit_with_source(90_000, "b2", "admin", with(&["127.0.0.1:5000/hello:2"]), Some(bases), source).unwrap();
    let out = drain(&mut core);
    for (task, _) in out.checks {
        core.cache_checked(91_000, task, true);
    }
    let out = drain(&mut core);
    assert_eq!(out.stitched.len(), 1);
    assert_eq!(core.statements("b2"), statements);

    // --provenance=false: the plain index, no statements.
    core.submit(95_000, "b3", "admin", spec(&["linux/amd64"]), None).unwrap();
    let out = drain(&mut core);
    let (conn, task, attempt, _, _) = out.assigned[0].clone();
    core.agent_msg(96_000, "x86", conn, AgentMsg::TaskDone { task, attempt, manifest: manifest(9), timings: vec![] });
    let out = drain(&mut core);
    assert_eq!(oci::parse_index(&out.stitched[0]).unwrap().len(), 1);
    assert!(core.statements("b3").is_empty());
}

#[test]
fn each_platform_gets_its_own_cache_repository_from_the_build_or_the_coordinator() {
    use shared::cache::CacheRef;
    let default = CacheRef::parse_ref("reg.lan:5000/farm-cache", "cache_repo").unwrap();
    let arm: Platform = "linux/arm/v7".parse().unwrap();
    let mut s = spec(&["linux/arm/v7"]);
    assert_eq!(super::cache_for(&s, None, &arm), (None, vec![]));
    assert_eq!(
        super::cache_for(&s, Some(&default), &arm),
        (Some("reg.lan:5000/farm-cache/linux-arm-v7".into()), vec!["reg.lan:5000/farm-cache/linux-arm-v7".into()])
    );
    s.cache_to = Some("reg.lan:5000/app-cache:main".into());
    s.cache_from = vec!["reg.lan:5000/app-cache:main".into(), "reg.lan:5000/other".into()];
    assert_eq!(
        super::cache_for(&s, Some(&default), &arm),
        (
            Some("reg.lan:5000/app-cache/main/linux-arm-v7".into()),
            vec!["reg.lan:5000/app-cache/main/linux-arm-v7".into(), "reg.lan:5000/other/linux-arm-v7".into()]
        )
    );
    s.no_cache = true;
    assert_eq!(super::cache_for(&s, Some(&default), &arm).1, Vec::<String>::new());
}

#[test]
fn a_bad_cache_reference_is_refused_at_submission() {
    let mut core = Core::new(3000, 3);
    let mut s = spec(&["linux/amd64"]);
    s.cache_from = vec!["no-registry".into()];
    let e = core.submit(0, "b1", "alice", s, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--cache-from no-registry: names no registry; name yours, e.g. registry.lan:5000/no-registry"
    );
}

#[test]
fn a_wall_clock_jump_of_an_hour_expires_no_agent() {
    use std::time::{Duration, Instant};
    // The driver reads time from crate::clock: monotonic after one wall-clock reading at start.
    let start = Instant::now();
    let clock = crate::clock::Clock::anchored(1_000_000, start);
    let mut core = Core::new(15_000, 3);
    core.agent_up(clock.at(start), "pi", 1, "a".into(), info(&["linux/arm64"], &[], &[])).unwrap();
    // Heartbeats every 5 s for a minute while the wall clock is stepped an hour ahead, which the
    // clock never reads again: no deadline moves, the agent stays online.
    for s in (5..=60).step_by(5) {
        let now = clock.at(start + Duration::from_secs(s));
        core.agent_msg(now, "pi", 1, AgentMsg::Heartbeat(Heartbeat { busy: 0 }));
        core.handle_timeout(now);
    }
    assert_eq!(core.agents()[0].state, shared::proto::AgentState::Online);
    // What a wall-clock reading an hour ahead would have done: every agent expired at once.
    core.handle_timeout(clock.at(start + Duration::from_secs(60)) + 3_600_000);
    assert_eq!(core.agents()[0].state, shared::proto::AgentState::Offline);
}

#[test]
fn the_next_build_of_a_dockerfile_imports_the_layerless_steps_the_last_one_exported() {
    use shared::cache::CacheRef;
    let repo = "reg.lan:5000/farm-cache/linux-amd64";
    let mut core = Core::new(15_000, 3)
        .with_cache_repo(Some(CacheRef::parse_ref("reg.lan:5000/farm-cache", "cache_repo").unwrap()));
    core.agent_up(0, "x86", 1, "a".into(), info(&["linux/amd64"], &[], &[])).unwrap();
    drain(&mut core);
    let assigned = |core: &mut Core| {
        let mut found = None;
        while let Some(a) = core.poll_action() {
            if let Action::Send { msg: CoordMsg::Assign(a), .. } = a {
                found = Some(*a);
            }
        }
        found.expect("an assignment")
    };
    let mut s = spec(&["linux/amd64"]);
    core.submit(0, "b1", "admin", s.clone(), None).unwrap();
    let a = assigned(&mut core);
    assert_eq!(a.cache_import, Vec::<String>::new(), "nothing exported yet");
    let log = [
        "[1/2] STEP 1/4: FROM busybox AS build".to_string(),
        "[1/2] STEP 2/4: ARG N=1".into(),
        format!("--> Pushing cache {repo}:k2"),
        "[1/2] STEP 3/4: RUN echo".into(),
        format!("--> Pushing cache {repo}:k3"),
        "[2/2] STEP 1/2: FROM busybox".into(),
        "[2/2] STEP 2/2: CMD [\"sh\"]".into(),
        "[2/2] COMMIT app".into(),
        format!("--> Pushing cache {repo}:k5"),
    ];
    for line in log {
        core.agent_msg(1, "x86", 1, AgentMsg::TaskLog { task: a.task, attempt: a.attempt, line });
    }
    let done = AgentMsg::TaskDone { task: a.task, attempt: a.attempt, manifest: manifest(1), timings: vec![] };
    core.agent_msg(2, "x86", 1, done);
    drain(&mut core);
    // Another context of the same Dockerfile and image: the layer-less steps of a first build.
    s.context = digest(7);
    core.submit(3, "b2", "admin", s.clone(), None).unwrap();
    let a = assigned(&mut core);
    assert_eq!(a.cache_import, [format!("{repo}:k2"), format!("{repo}:k5")]);
    // Another image's build shares none of it.
    s.context = digest(8);
    s.tags = vec!["127.0.0.1:5000/other:1".into()];
    core.agent_msg(4, "x86", 1, AgentMsg::TaskFailed { task: a.task, attempt: a.attempt, error: "x".into() });
    drain(&mut core);
    core.submit(5, "b3", "admin", s, None).unwrap();
    assert_eq!(assigned(&mut core).cache_import, Vec::<String>::new());
}

#[test]
fn the_result_cache_keeps_at_most_its_bound_and_shares_each_statement_with_its_task() {
    let mut core = three_agent_farm().with_ended_builds_kept(4);
    let bases = || Some(vec![]);
    let builds = HISTORY_KEYS + 10;
    for i in 0..builds {
        let mut s = spec(&["linux/arm64"]);
        s.build_args = vec![("N".into(), i.to_string())];
        let id = format!("b{i}");
        core.submit(i as u64, &id, "admin", s, bases()).unwrap();
        let (conn, task, attempt, _, _) = drain(&mut core).assigned[0].clone();
        core.agent_msg(
            i as u64,
            "pi64",
            conn,
            AgentMsg::TaskDone { task, attempt, manifest: manifest(3), timings: vec![] },
        );
        core.stitched(&id, Ok(digest(99)), i as u64);
        drain(&mut core);
        core.take_batch();
    }
    assert_eq!(core.cache.len(), HISTORY_KEYS, "{builds} distinct results, at most {HISTORY_KEYS} remembered");
    // The newest result's statement: one allocation, held by its task and its cache entry.
    let (_, t) = core.tasks.iter().next_back().unwrap();
    let entry = &core.cache[t.cache_key.as_ref().unwrap()];
    let (a, b) = (t.statement.as_ref().unwrap(), entry.statement.as_ref().unwrap());
    assert!(Arc::ptr_eq(a, b), "the cache entry shares its task's statement");
}
