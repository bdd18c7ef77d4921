//! The workers' key memory (`key_records`), driven as the adapter drives it: a stream asking for
//! a project's recipients, the timer ticking, the key service's answers (the python-tuf fixtures
//! of `tests/fixtures/tuf`, or none at all). Several `KeyWorker`s over one store are the workers
//! of one Envoy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod gateway;
    pub mod tuf;
}

use common::gateway::{demo_recipients, MapStore};
use common::tuf::{key_service, serve, NOW};
use ocicrypt_core::config::{Config, KeyServiceConfig};
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::keys::keyservice::{self, KeyRecord, RETRY_AFTER_FAILURE_SECS};
use ocicrypt_core::keys::records::{
    last_failure, read_table, KeyCommand, KeyLevel, KeyMetric, KeyStep, KeyWorker, Lease,
    Resolution, StreamLookup, FAILURE_KEY,
};
use ocicrypt_core::store::Store;

fn config_with(ks: Option<KeyServiceConfig>) -> Config {
    let mut config = Config::parse(br#"{"registry":{"cluster":"registry"}}"#).unwrap();
    config.key_service = ks;
    config
}

fn config() -> Config {
    config_with(Some(key_service(1024)))
}

/// The key service: the good repository; `None` = down (every fetch unanswered).
#[derive(Clone, Copy)]
enum Service {
    Good,
    Down,
}

impl Service {
    fn answer(self, path: &str) -> (u16, Vec<u8>) {
        match self {
            Service::Down => (0, Vec::new()),
            Service::Good => serve(&[], path),
        }
    }
}

/// What a stream gets for `project` at `now`, running its lookup to the end against `service`;
/// with the fetches it made.
fn stream_keys(
    worker: &mut KeyWorker,
    config: &Config,
    store: &MapStore,
    project: &str,
    now: i64,
    service: Service,
) -> (
    Result<Vec<ocicrypt_core::format::recipients::Recipient>, OciError>,
    usize,
) {
    let mut lookup = StreamLookup::default();
    let mut fetches = 0;
    let mut step = worker.recipients(config, store, project, now, &mut lookup);
    for _ in 0..100 {
        match step {
            Err(e) => return (Err(e), fetches),
            Ok(KeyStep::Ready(r)) => return (Ok(r), fetches),
            Ok(KeyStep::Fetch(req)) => {
                fetches += 1;
                assert!(lookup.waiting());
                let (status, body) = service.answer(&req.path);
                step = match worker.on_stream_answer(config, store, &mut lookup, status, &body, now)
                {
                    Some(req) => Ok(KeyStep::Fetch(req)),
                    None => worker.recipients(config, store, project, now, &mut lookup),
                };
            }
        }
    }
    panic!("the lookup did not finish");
}

/// A stream looked `demo` up at `NOW` against the good key service: its keys are known.
fn demo_looked_up(worker: &mut KeyWorker, config: &Config, store: &MapStore) {
    let (keys, _) = stream_keys(worker, config, store, "demo", NOW, Service::Good);
    assert!(keys.is_ok());
}

/// Answers a timer refresh's fetches from the good key service, starting with `fetch`, until it
/// ends; the paths fetched.
fn run_timer_refresh(
    worker: &mut KeyWorker,
    store: &MapStore,
    mut fetch: Option<keyservice::Request>,
    at: i64,
) -> Vec<String> {
    let mut paths = Vec::new();
    while let Some(req) = fetch {
        let (status, body) = Service::Good.answer(&req.path);
        paths.push(req.path);
        fetch = worker.on_timer_answer(store, status, &body, at);
    }
    paths
}

fn metrics(commands: &[KeyCommand]) -> Vec<KeyMetric> {
    commands
        .iter()
        .filter_map(|c| match c {
            KeyCommand::Metric(m) => Some(m.clone()),
            KeyCommand::Log(..) => None,
        })
        .collect()
}

fn count(commands: &[KeyCommand], metric: &KeyMetric) -> usize {
    metrics(commands).iter().filter(|m| *m == metric).count()
}

fn refusal(result: Result<Vec<ocicrypt_core::format::recipients::Recipient>, OciError>) -> String {
    let Err(err) = result else {
        panic!("not refused")
    };
    assert_eq!(err.code, Code::Unavailable);
    err.message
}

#[test]
fn resolve_answers_ready_look_up_or_refuses() {
    let store = MapStore::default();
    let mut worker = KeyWorker::new();
    // Inline recipients win, whatever the key service.
    let mut inline = config_with(None);
    inline
        .projects
        .insert("demo".to_string(), demo_recipients());
    assert!(matches!(
        worker.resolve(&inline, &store, "demo", NOW, false),
        Ok(Resolution::Ready(r)) if r == demo_recipients()
    ));
    let table: &[(&str, Option<KeyServiceConfig>, &str)] = &[
        (
            "nosuch",
            None,
            "the gateway has no key service and no inline recipients for it",
        ),
        (
            "Bad_Name",
            Some(key_service(1024)),
            "it is not a project name",
        ),
        ("-x", Some(key_service(1024)), "it is not a project name"),
    ];
    for (project, ks, reason) in table {
        let err = worker
            .resolve(&config_with(ks.clone()), &store, project, NOW, false)
            .err()
            .unwrap_or_else(|| panic!("{project}: not refused"));
        assert_eq!(err.code, Code::Unavailable, "{project}");
        assert!(err.message.contains(reason), "{project}: {}", err.message);
        assert!(
            err.message.starts_with(&format!(
                "no verified recipient keys for project {project:?}: "
            )),
            "{}",
            err.message
        );
        assert!(err.message.ends_with("; nothing was stored. Retry later, or ask the key-service owners to publish the project's recipients"));
    }
    // A project name without a record: look it up (nothing asked of the store's table yet).
    assert!(matches!(
        worker.resolve(&config(), &store, "demo", NOW, false),
        Ok(Resolution::LookUp)
    ));
    // After its lookup, a request never asks for a second one.
    let err = worker
        .resolve(&config(), &store, "demo", NOW, true)
        .err()
        .unwrap();
    assert!(
        err.message
            .contains("the key service lookup gave no answer"),
        "{}",
        err.message
    );
    assert!(worker.take_commands().is_empty());
}

#[test]
fn a_lookup_publishes_a_record_every_worker_reads() {
    let store = MapStore::default();
    let config = config();
    let mut first = KeyWorker::new();
    let (keys, fetches) = stream_keys(&mut first, &config, &store, "demo", NOW, Service::Good);
    assert!(!keys.unwrap().is_empty());
    assert!(
        fetches >= 4,
        "root, timestamp, snapshot, targets, target: {fetches}"
    );
    let commands = first.take_commands();
    assert_eq!(count(&commands, &KeyMetric::Fetch), fetches);
    assert_eq!(count(&commands, &KeyMetric::ProjectLookup), 1);
    assert_eq!(count(&commands, &KeyMetric::ProjectFailure), 0);
    assert!(metrics(&commands).contains(&KeyMetric::TufVersion("root".into(), 2)));
    assert!(metrics(&commands).contains(&KeyMetric::Remembered(1)));
    // A request's lookup logs only failures.
    assert!(!commands.iter().any(|c| matches!(c, KeyCommand::Log(..))));

    // The record round-trips through the store, as another worker reads it.
    let bytes = store.get(&keyservice::record_key("demo")).unwrap();
    let record = KeyRecord::from_bytes(&bytes).unwrap();
    assert_eq!(KeyRecord::from_bytes(&record.to_bytes()), Some(record));
    assert!(store.get(keyservice::METADATA_KEY).is_some());
    let mut second = KeyWorker::new();
    let (keys, fetches) = stream_keys(
        &mut second,
        &config,
        &store,
        "demo",
        NOW + 10,
        Service::Down,
    );
    assert!(!keys.unwrap().is_empty());
    assert_eq!(fetches, 0, "a fresh record needs no lookup");
    // The refresh lease of the request-path refresh was given back when it finished.
    assert!(!Lease::REFRESHING.held(&store, NOW));
}

#[test]
fn a_stale_record_is_looked_up_again_and_resumes_from_recent_metadata() {
    let store = MapStore::default();
    let config = config();
    let mut worker = KeyWorker::new();
    demo_looked_up(&mut worker, &config, &store);
    worker.take_commands();
    // Within max_age_seconds (180): fresh.
    assert!(matches!(
        worker.resolve(&config, &store, "demo", NOW + 180, false),
        Ok(Resolution::Ready(_))
    ));
    // Past it: stale, looked up again.
    assert!(matches!(
        worker.resolve(&config, &store, "demo", NOW + 181, false),
        Ok(Resolution::LookUp)
    ));
    // A request that looked up and still finds it stale is told why.
    let err = KeyWorker::new()
        .resolve(&config, &store, "demo", NOW + 181, true)
        .err()
        .unwrap();
    assert!(
        err.message
            .contains("the recipients were last verified 181s ago (limit 180s)"),
        "{}",
        err.message
    );
    // Another project within reuse_seconds of the full refresh starts from its metadata: only
    // the target is fetched.
    let (keys, fetches) = stream_keys(
        &mut worker,
        &config,
        &store,
        "tribe-a-web",
        NOW + 30,
        Service::Good,
    );
    assert!(keys.is_ok());
    assert!(
        fetches <= 2,
        "resumed lookups fetch the target only: {fetches}"
    );
    assert_eq!(count(&worker.take_commands(), &KeyMetric::Resumed), 1);
}

#[test]
fn an_unknown_project_is_answered_from_memory_then_asked_again() {
    let store = MapStore::default();
    let config = config();
    let mut worker = KeyWorker::new();
    let (keys, _) = stream_keys(&mut worker, &config, &store, "nosuch", NOW, Service::Good);
    let message = refusal(keys);
    assert!(
        message.contains("no recipients for this project"),
        "{message}"
    );
    let commands = worker.take_commands();
    assert!(
        commands.contains(&KeyCommand::Log(
            KeyLevel::Warn,
            format!(
                "key service: project nosuch: {}",
                message
                    .trim_start_matches("no verified recipient keys for project \"nosuch\": ")
                    .split("; nothing was stored")
                    .next()
                    .unwrap()
            )
        )),
        "{commands:?}"
    );
    assert_eq!(count(&commands, &KeyMetric::ProjectFailure), 1);
    // No store key of its own (Envoy cannot delete keys): its line in the table only.
    assert_eq!(store.get(&keyservice::record_key("nosuch")), None);
    assert!(read_table(&store).get("nosuch").is_some_and(|e| e.unknown));
    // Another worker answers from memory, without a lookup, for refresh_seconds.
    let mut other = KeyWorker::new();
    let (keys, fetches) = stream_keys(
        &mut other,
        &config,
        &store,
        "nosuch",
        NOW + 59,
        Service::Good,
    );
    assert!(refusal(keys).contains(keyservice::UNKNOWN_PROJECT));
    assert_eq!(fetches, 0);
    assert_eq!(metrics(&other.take_commands()), vec![KeyMetric::FromMemory]);
    // Then it is asked again.
    assert!(matches!(
        other.resolve(&config, &store, "nosuch", NOW + 60, false),
        Ok(Resolution::LookUp)
    ));
}

#[test]
fn a_key_service_that_does_not_answer_fails_closed_and_is_remembered() {
    let store = MapStore::default();
    let config = config();
    let mut worker = KeyWorker::new();
    let (keys, fetches) = stream_keys(&mut worker, &config, &store, "demo", NOW, Service::Down);
    let message = refusal(keys);
    assert!(message.contains("unreachable"), "{message}");
    assert_eq!(fetches, 1, "the first fetch fails the refresh");
    let (at, reason) = last_failure(&store).unwrap();
    assert_eq!(at, NOW);
    assert!(message.contains(&reason), "{message} / {reason}");
    // Every worker answers from the failure for RETRY_AFTER_FAILURE_SECS, without a lookup.
    for project in ["demo", "tribe-b-1"] {
        let mut other = KeyWorker::new();
        let (keys, fetches) = stream_keys(
            &mut other,
            &config,
            &store,
            project,
            NOW + RETRY_AFTER_FAILURE_SECS - 1,
            Service::Good,
        );
        assert!(refusal(keys).contains(&reason), "{project}");
        assert_eq!(fetches, 0, "{project}");
        assert_eq!(metrics(&other.take_commands()), vec![KeyMetric::FromMemory]);
    }
    // Then a lookup refreshes in full (the failure is newer than any metadata), succeeds, and
    // forgets the failure.
    let later = NOW + RETRY_AFTER_FAILURE_SECS;
    let (keys, _) = stream_keys(
        &mut worker,
        &config,
        &store,
        "tribe-b-1",
        later,
        Service::Good,
    );
    assert!(keys.is_ok());
    assert_eq!(last_failure(&store), None);
    assert_eq!(store.get(FAILURE_KEY).as_deref(), Some(&b"{\"at\":0}"[..]));
}

#[test]
fn a_fetch_the_host_cannot_dispatch_is_an_unanswered_fetch() {
    let store = MapStore::default();
    let config = config();
    let mut worker = KeyWorker::new();
    let mut lookup = StreamLookup::default();
    let step = worker.recipients(&config, &store, "demo", NOW, &mut lookup);
    assert!(matches!(step, Ok(KeyStep::Fetch(_))));
    // Fed back as no answer: the lookup is over; asked again, the request is refused.
    assert_eq!(
        worker.on_stream_answer(&config, &store, &mut lookup, 0, &[], NOW),
        None
    );
    let err = worker
        .recipients(&config, &store, "demo", NOW, &mut lookup)
        .err()
        .unwrap();
    assert!(err.message.contains("unreachable"), "{}", err.message);
    assert!(!lookup.waiting());
    let commands = worker.take_commands();
    assert_eq!(count(&commands, &KeyMetric::Fetch), 1);
    assert_eq!(count(&commands, &KeyMetric::ProjectFailure), 1);
}

#[test]
fn while_a_failing_key_service_is_asked_again_other_requests_wait_for_it() {
    let store = MapStore::default();
    let config = config();
    let mut worker = KeyWorker::new();
    let (keys, _) = stream_keys(&mut worker, &config, &store, "demo", NOW, Service::Down);
    refusal(keys);
    // Past the retry delay one request refreshes in full again, holding the lease...
    let later = NOW + RETRY_AFTER_FAILURE_SECS;
    let mut lookup = StreamLookup::default();
    assert!(matches!(
        worker.recipients(&config, &store, "demo", later, &mut lookup),
        Ok(KeyStep::Fetch(_))
    ));
    assert!(Lease::REFRESHING.held(&store, later));
    // ...and the others are answered from the failure meanwhile.
    let mut other = KeyWorker::new();
    let (keys, fetches) = stream_keys(
        &mut other,
        &config,
        &store,
        "tribe-a-web",
        later,
        Service::Good,
    );
    assert!(refusal(keys).contains("unreachable"));
    assert_eq!(fetches, 0);
}

#[test]
fn a_lease_is_taken_held_expires_and_is_released() {
    let store = MapStore::default();
    for lease in [Lease::TIMER, Lease::REFRESHING] {
        assert!(!lease.held(&store, NOW));
        assert!(lease.take(&store, NOW, 10), "free: taken");
        assert!(lease.held(&store, NOW + 9));
        assert!(!lease.take(&store, NOW + 9, 10), "held: not taken twice");
        assert!(!lease.held(&store, NOW + 10));
        assert!(lease.take(&store, NOW + 10, 10), "expired: taken again");
        lease.release(&store);
        assert!(!lease.held(&store, NOW + 11));
        assert!(lease.take(&store, NOW + 11, 10), "released: taken again");
    }
    // Two workers that read it free at once: the compare-and-set lets one through.
    let (_, cas) = store.get_cas(Lease::TIMER.key()).unwrap();
    assert!(store.set_cas(Lease::TIMER.key(), b"0", cas));
    assert!(!store.set_cas(Lease::TIMER.key(), b"0", cas));
}

#[test]
fn one_worker_per_period_refreshes_the_projects_in_use() {
    let store = MapStore::default();
    let config = config();
    let ks = config.key_service.clone().unwrap();
    let mut a = KeyWorker::new();
    let mut b = KeyWorker::new();
    // Nothing in use: no refresh, no lease.
    assert_eq!(a.on_tick(&ks, &store, NOW), None);
    assert!(!Lease::TIMER.held(&store, NOW));
    assert_eq!(
        a.take_commands(),
        vec![KeyCommand::Metric(KeyMetric::Remembered(0))]
    );
    demo_looked_up(&mut b, &config, &store);
    b.take_commands();

    let tick = NOW + 1;
    let fetch = a.on_tick(&ks, &store, tick);
    assert!(fetch.is_some());
    assert!(a.timer_waiting());
    assert_eq!(b.on_tick(&ks, &store, tick), None, "the lease is taken");
    assert_eq!(
        a.on_tick(&ks, &store, tick + 1),
        None,
        "its refresh is in flight"
    );
    let paths = run_timer_refresh(&mut a, &store, fetch, tick);
    assert!(!a.timer_waiting());
    // A full refresh: the next root, the timestamp, then the target (snapshot unchanged).
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert_eq!(
        paths[..2],
        ["/metadata/3.root.json", "/metadata/timestamp.json"]
    );
    assert!(paths[2].ends_with(".demo.json"), "{paths:?}");
    let commands = a.take_commands();
    assert!(commands.iter().any(|c| matches!(c,
        KeyCommand::Log(KeyLevel::Info, line) if line.starts_with("key service refresh: project demo: verified ("))));
    let record =
        KeyRecord::from_bytes(&store.get(&keyservice::record_key("demo")).unwrap()).unwrap();
    assert_eq!(record.checked_at, tick);
    // The next period's lease: taken by whichever ticks first after it ran out.
    assert_eq!(b.on_tick(&ks, &store, tick + 58), None);
    assert!(b.on_tick(&ks, &store, tick + 59).is_some());
}

#[test]
fn a_timer_refresh_that_gets_no_answer_logs_and_remembers_the_failure() {
    let store = MapStore::default();
    let config = config();
    let ks = config.key_service.clone().unwrap();
    let mut worker = KeyWorker::new();
    demo_looked_up(&mut worker, &config, &store);
    worker.take_commands();
    assert!(worker.on_tick(&ks, &store, NOW + 1).is_some());
    // Timed out (Envoy calls back with no answer).
    assert_eq!(worker.on_timer_answer(&store, 0, &[], NOW + 2), None);
    let commands = worker.take_commands();
    assert!(commands.iter().any(|c| matches!(c,
        KeyCommand::Log(KeyLevel::Warn, line) if line.starts_with("key service refresh: project demo: ") && line.contains("unreachable"))), "{commands:?}");
    assert_eq!(last_failure(&store).map(|(at, _)| at), Some(NOW + 2));
    // The record that existed is overwritten: its keys stop being used at once.
    let (keys, fetches) = stream_keys(&mut worker, &config, &store, "demo", NOW + 3, Service::Good);
    assert!(refusal(keys).contains("unreachable"));
    assert_eq!(fetches, 0);
}

#[test]
fn a_flood_of_unknown_projects_stays_within_max_projects() {
    let store = MapStore::default();
    let config = config_with(Some(key_service(4)));
    let mut worker = KeyWorker::new();
    demo_looked_up(&mut worker, &config, &store);
    let mut refused_for_room = 0;
    for i in 0..40 {
        let project = format!("flood-{i}");
        let (keys, _) = stream_keys(
            &mut worker,
            &config,
            &store,
            &project,
            NOW + 1,
            Service::Good,
        );
        let message = refusal(keys);
        if message.contains("key_service.max_projects (4)") {
            refused_for_room += 1;
        }
        assert_eq!(
            store.get(&keyservice::record_key(&project)),
            None,
            "{project}"
        );
        assert!(read_table(&store).len() <= 4);
    }
    // The known project in use is never dropped for unknown ones.
    assert!(read_table(&store).get("demo").is_some());
    let (keys, fetches) = stream_keys(&mut worker, &config, &store, "demo", NOW + 2, Service::Down);
    assert!(keys.is_ok());
    assert_eq!(fetches, 0);
    assert_eq!(
        refused_for_room, 0,
        "unknown lines make room for each other"
    );
    let remembered = metrics(&worker.take_commands())
        .into_iter()
        .filter_map(|m| match m {
            KeyMetric::Remembered(n) => Some(n),
            _ => None,
        })
        .max();
    assert_eq!(remembered, Some(4));
}

#[test]
fn known_projects_in_use_are_never_dropped_for_new_ones() {
    let store = MapStore::default();
    let config = config_with(Some(key_service(2)));
    let mut worker = KeyWorker::new();
    for project in ["demo", "tribe-a-web"] {
        let (keys, _) = stream_keys(&mut worker, &config, &store, project, NOW, Service::Good);
        assert!(keys.is_ok(), "{project}");
    }
    let (keys, fetches) = stream_keys(
        &mut worker,
        &config,
        &store,
        "tribe-b-1",
        NOW + 1,
        Service::Good,
    );
    assert!(refusal(keys).contains(
        "the gateway already keeps the keys of key_service.max_projects (2) projects in use; raise the limit"
    ));
    assert_eq!(fetches, 0);
    // Once one of them is idle past idle_seconds (an hour), its line makes room.
    let idle = NOW + keyservice::idle_seconds(config.key_service.as_ref().unwrap()) + 1;
    assert!(matches!(
        worker.resolve(&config, &store, "tribe-b-1", idle, false),
        Ok(Resolution::LookUp)
    ));
}

#[test]
fn a_record_from_a_later_refresh_is_never_replaced_by_an_earlier_one() {
    let store = MapStore::default();
    let config = config();
    let ks = config.key_service.clone().unwrap();
    let mut worker = KeyWorker::new();
    demo_looked_up(&mut worker, &config, &store);
    // Another worker published a later refresh meanwhile (a rotation).
    let key = keyservice::record_key("demo");
    let mut later = KeyRecord::from_bytes(&store.get(&key).unwrap()).unwrap();
    later.checked_at = NOW + 100;
    store.set(&key, &later.to_bytes()).unwrap();
    // This worker's timer refresh finishes with an earlier one: the later record stays.
    let fetch = worker.on_tick(&ks, &store, NOW + 1);
    assert!(fetch.is_some());
    run_timer_refresh(&mut worker, &store, fetch, NOW + 1);
    assert_eq!(
        KeyRecord::from_bytes(&store.get(&key).unwrap()),
        Some(later)
    );
}
