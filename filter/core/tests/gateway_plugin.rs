//! The worker's side of the gateway (`gateway::plugin`), its stats table (`gateway::metrics`)
//! and local replies, driven as a host drives them: configuration bytes, ticks, callouts
//! answered from the python-tuf fixtures (`tests/fixtures/tuf`) or not at all, streams that
//! need a project's keys. What a host must do is read off the commands.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod gateway;
    pub mod queues;
    pub mod tuf;
}

use std::time::Duration;

use common::gateway::{req, MapStore, Req, UUID};
use common::queues::Queues;
use common::tuf::{initial_root, serve, NOW};
use ocicrypt_core::distribution::ledger_cache::Change as CacheChange;
use ocicrypt_core::distribution::upload::UploadRecord;
use ocicrypt_core::distribution::upload_table;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::metrics::{Change, Kind, Stat, TufRole, Update, REFUSAL_CODES};
use ocicrypt_core::gateway::plugin::{tick_period, Host, Plugin, PluginCommand, PREFIX};
use ocicrypt_core::gateway::prefetch::Report;
use ocicrypt_core::gateway::{
    fetch_status, CalloutAnswer, Command, Level, LocalReply, Metric, Stream,
};
use ocicrypt_core::keys::keyservice;
use ocicrypt_core::keys::records::KeyMetric;
use ocicrypt_core::store::Store;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// The stats.

#[test]
fn the_stats_are_these_names_and_kinds_in_this_order() {
    use Kind::{Counter, Gauge, Histogram};
    let table: &[(Stat, &str, Kind)] = &[
        (Stat::LayersEncrypted, "ocicrypt.layers_encrypted", Counter),
        (Stat::BytesEncrypted, "ocicrypt.bytes_encrypted", Counter),
        (Stat::JsonBlobsPassed, "ocicrypt.json_blobs_passed", Counter),
        (
            Stat::ManifestsRewritten,
            "ocicrypt.manifests_rewritten",
            Counter,
        ),
        (Stat::MountsRewritten, "ocicrypt.mounts_rewritten", Counter),
        (Stat::UploadsInFlight, "ocicrypt.uploads_in_flight", Gauge),
        (
            Stat::LedgerCacheEntries,
            "ocicrypt.ledger_cache_entries",
            Gauge,
        ),
        (Stat::LedgerEvictions, "ocicrypt.ledger_evictions", Counter),
        (
            Stat::UploadSessionsMoved,
            "ocicrypt.upload_sessions_moved",
            Counter,
        ),
        (Stat::LayerBytes, "ocicrypt.layer_bytes", Histogram),
        (
            Stat::ProjectLookups,
            "ocicrypt.keyservice.project_lookups",
            Counter,
        ),
        (
            Stat::ProjectFailures,
            "ocicrypt.keyservice.project_failures",
            Counter,
        ),
        (
            Stat::KeystreamAsked,
            "ocicrypt.keystream.asked_bytes",
            Counter,
        ),
        (
            Stat::KeystreamUsed,
            "ocicrypt.keystream.used_bytes",
            Counter,
        ),
        (
            Stat::KeystreamRefused,
            "ocicrypt.keystream.refused_segments",
            Counter,
        ),
        (
            Stat::KeystreamServed,
            "ocicrypt.keystream.served_bytes",
            Counter,
        ),
        (
            Stat::KeystreamDeclined,
            "ocicrypt.keystream.declined_requests",
            Counter,
        ),
        (
            Stat::TufVersion(TufRole::Root),
            "ocicrypt.keyservice.root_version",
            Gauge,
        ),
        (
            Stat::TufVersion(TufRole::Timestamp),
            "ocicrypt.keyservice.timestamp_version",
            Gauge,
        ),
        (
            Stat::TufVersion(TufRole::Snapshot),
            "ocicrypt.keyservice.snapshot_version",
            Gauge,
        ),
        (
            Stat::TufVersion(TufRole::Targets),
            "ocicrypt.keyservice.targets_version",
            Gauge,
        ),
        (
            Stat::Refusals(Code::DigestInvalid),
            "ocicrypt.refusals.digest_invalid",
            Counter,
        ),
        (
            Stat::Refusals(Code::ManifestInvalid),
            "ocicrypt.refusals.manifest_invalid",
            Counter,
        ),
        (
            Stat::Refusals(Code::BlobUploadInvalid),
            "ocicrypt.refusals.blob_upload_invalid",
            Counter,
        ),
        (
            Stat::Refusals(Code::BlobUploadUnknown),
            "ocicrypt.refusals.blob_upload_unknown",
            Counter,
        ),
        (
            Stat::Refusals(Code::SizeInvalid),
            "ocicrypt.refusals.size_invalid",
            Counter,
        ),
        (
            Stat::Refusals(Code::Denied),
            "ocicrypt.refusals.denied",
            Counter,
        ),
        (
            Stat::Refusals(Code::Unsupported),
            "ocicrypt.refusals.unsupported",
            Counter,
        ),
        (
            Stat::Refusals(Code::Unavailable),
            "ocicrypt.refusals.unavailable",
            Counter,
        ),
        (
            Stat::Refusals(Code::Unknown),
            "ocicrypt.refusals.unknown",
            Counter,
        ),
        (
            Stat::Refusals(Code::Unauthorized),
            "ocicrypt.refusals.unauthorized",
            Counter,
        ),
        (
            Stat::Refusals(Code::BadGateway),
            "ocicrypt.refusals.bad_gateway",
            Counter,
        ),
        (
            Stat::ProjectsRemembered,
            "ocicrypt.keyservice.projects_remembered",
            Gauge,
        ),
        (Stat::KeyFetches, "ocicrypt.keyservice.fetches", Counter),
        (
            Stat::AnsweredFromMemory,
            "ocicrypt.keyservice.answered_from_memory",
            Counter,
        ),
        (
            Stat::ResumedLookups,
            "ocicrypt.keyservice.resumed_lookups",
            Counter,
        ),
    ];
    assert_eq!(Stat::ALL.len(), table.len());
    for (i, (stat, name, kind)) in table.iter().enumerate() {
        assert_eq!(Stat::ALL[i], *stat);
        assert_eq!(stat.index(), Some(i), "{stat:?}");
        assert_eq!(stat.name(), *name);
        assert_eq!(stat.kind(), *kind, "{name}");
    }
    // Every refusal code is counted, each under its own name (a 502 goes out as `UNKNOWN`).
    let names: std::collections::BTreeSet<String> = REFUSAL_CODES
        .iter()
        .map(|c| Stat::Refusals(*c).name())
        .collect();
    assert_eq!(names.len(), REFUSAL_CODES.len());
    for code in [
        Code::DigestInvalid,
        Code::ManifestInvalid,
        Code::BlobUploadInvalid,
        Code::BlobUploadUnknown,
        Code::SizeInvalid,
        Code::Denied,
        Code::Unsupported,
        Code::Unavailable,
        Code::Unknown,
        Code::BadGateway,
        Code::Unauthorized,
    ] {
        assert!(
            Stat::Refusals(code).index().is_some(),
            "{code:?} is not counted"
        );
    }
}

fn add(stat: Stat, n: i64) -> Update {
    Update {
        stat,
        change: Change::Add(n),
    }
}

#[test]
fn each_metric_updates_these_stats() {
    let set = |stat, v| Update {
        stat,
        change: Change::Set(v),
    };
    let table: Vec<(Metric, Vec<Update>)> = vec![
        (
            Metric::Refused(Code::Denied),
            vec![add(Stat::Refusals(Code::Denied), 1)],
        ),
        (
            Metric::Refused(Code::BadGateway),
            vec![add(Stat::Refusals(Code::BadGateway), 1)],
        ),
        (Metric::MountRewritten, vec![add(Stat::MountsRewritten, 1)]),
        (
            Metric::ManifestRewritten,
            vec![add(Stat::ManifestsRewritten, 1)],
        ),
        (
            Metric::UploadState(-3),
            vec![add(Stat::UploadsInFlight, -3)],
        ),
        (
            Metric::LedgerCache(CacheChange {
                entries: 1,
                evicted: 2,
            }),
            vec![
                add(Stat::LedgerCacheEntries, 1),
                add(Stat::LedgerEvictions, 2),
            ],
        ),
        (
            Metric::LedgerCache(CacheChange {
                entries: 0,
                evicted: 0,
            }),
            vec![],
        ),
        (
            Metric::SessionMoved,
            vec![add(Stat::UploadSessionsMoved, 1)],
        ),
        (
            Metric::Keystream(Report {
                asked: 5,
                used: 0,
                refused: 1,
                served: 0,
                declined: 2,
            }),
            vec![
                add(Stat::KeystreamAsked, 5),
                add(Stat::KeystreamRefused, 1),
                add(Stat::KeystreamDeclined, 2),
            ],
        ),
        (
            Metric::LayerEncrypted(4096),
            vec![
                add(Stat::LayersEncrypted, 1),
                add(Stat::BytesEncrypted, 4096),
                Update {
                    stat: Stat::LayerBytes,
                    change: Change::Record(4096),
                },
            ],
        ),
        (
            Metric::LayerEncrypted(u64::MAX),
            vec![
                add(Stat::LayersEncrypted, 1),
                add(Stat::BytesEncrypted, i64::MAX),
                Update {
                    stat: Stat::LayerBytes,
                    change: Change::Record(u64::MAX),
                },
            ],
        ),
        (Metric::BlobPassed, vec![add(Stat::JsonBlobsPassed, 1)]),
        (
            Metric::Key(KeyMetric::Remembered(7)),
            vec![set(Stat::ProjectsRemembered, 7)],
        ),
        (
            Metric::Key(KeyMetric::Fetch),
            vec![add(Stat::KeyFetches, 1)],
        ),
        (
            Metric::Key(KeyMetric::FromMemory),
            vec![add(Stat::AnsweredFromMemory, 1)],
        ),
        (
            Metric::Key(KeyMetric::Resumed),
            vec![add(Stat::ResumedLookups, 1)],
        ),
        (
            Metric::Key(KeyMetric::ProjectLookup),
            vec![add(Stat::ProjectLookups, 1)],
        ),
        (
            Metric::Key(KeyMetric::ProjectFailure),
            vec![add(Stat::ProjectFailures, 1)],
        ),
        (
            Metric::Key(KeyMetric::TufVersion("snapshot".into(), 9)),
            vec![set(Stat::TufVersion(TufRole::Snapshot), 9)],
        ),
        // Delegated roles are not gauged.
        (
            Metric::Key(KeyMetric::TufVersion("tribe-a".into(), 9)),
            vec![],
        ),
    ];
    for (metric, updates) in table {
        assert_eq!(metric.updates(), updates, "{metric:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Local replies, key-service statuses, host failures.

#[test]
fn local_replies_carry_the_marker_of_who_answered() {
    let mut unauthorized = OciError::new(Code::Unauthorized, "log in");
    unauthorized.challenge = Some("Bearer realm=\"r\"".into());
    let json = |marker: &str| {
        vec![
            ("content-type".to_string(), b"application/json".to_vec()),
            ("x-ocicrypt-filter".to_string(), marker.as_bytes().to_vec()),
        ]
    };
    let mut with_challenge = json("refused");
    with_challenge.push(("www-authenticate".into(), b"Bearer realm=\"r\"".to_vec()));
    let mut relayed = json("registry-refused");
    relayed.push(("www-authenticate".into(), b"Basic \xff".to_vec()));
    let table: Vec<(Command, Option<LocalReply>)> = vec![
        (
            Command::Reply(OciError::new(Code::Denied, "no")),
            Some(LocalReply {
                status: 403,
                headers: json("refused"),
                body: OciError::new(Code::Denied, "no").body(),
            }),
        ),
        (
            Command::Reply(unauthorized.clone()),
            Some(LocalReply {
                status: 401,
                headers: with_challenge,
                body: unauthorized.body(),
            }),
        ),
        (
            Command::Relay {
                status: 404,
                body: b"{\"errors\":[]}".to_vec(),
                challenge: Some(b"Basic \xff".to_vec()),
            },
            Some(LocalReply {
                status: 404,
                headers: relayed,
                body: b"{\"errors\":[]}".to_vec(),
            }),
        ),
        (
            Command::Respond {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: b"{}".to_vec(),
            },
            Some(LocalReply {
                status: 200,
                headers: vec![
                    ("x-ocicrypt-filter".into(), b"answered".to_vec()),
                    ("content-type".into(), b"application/json".to_vec()),
                ],
                body: b"{}".to_vec(),
            }),
        ),
        (Command::Continue, None),
        (Command::Pause, None),
    ];
    for (command, reply) in table {
        assert_eq!(command.local_reply(), reply, "{command:?}");
    }
}

#[test]
fn a_key_service_status_is_three_digits_or_no_answer() {
    let with = |value: &[u8]| CalloutAnswer {
        headers: vec![(":status".into(), value.to_vec())],
        body: Vec::new(),
    };
    assert_eq!(fetch_status(&CalloutAnswer::new(200, &[], b"")), 200);
    assert_eq!(fetch_status(&with(b"599")), 599);
    assert_eq!(fetch_status(&with(b"404")), 404);
    assert_eq!(fetch_status(&CalloutAnswer::default()), 0);
    for bad in [
        &b""[..],
        b"20",
        b"2000",
        b"+20",
        b" 200",
        b"099",
        b"600",
        b"20\xff",
    ] {
        assert_eq!(fetch_status(&with(bad)), 0, "{bad:?}");
    }
}

#[test]
fn a_failed_host_call_refuses_the_request() {
    let mut stream = Stream::new();
    let out = stream.on_host_failed("set header :path: host status 2 (BadArgument)");
    common::gateway::assert_refused(
        &out,
        Code::Unknown,
        "gateway host call failed (set header :path: host status 2 (BadArgument)); nothing was stored, retry",
    );
}

// ---------------------------------------------------------------------------------------------
// The worker: configuration, ticks, the key-service refresh, streams.

/// A host: its shared data, queues and randomness.
struct Envoy {
    store: MapStore,
    queues: Queues,
    rng: StdRng,
}

impl Envoy {
    fn new() -> Self {
        Envoy {
            store: MapStore::default(),
            queues: Queues::default(),
            rng: StdRng::seed_from_u64(17),
        }
    }
    fn at(&mut self, now: u64) -> Host<'_> {
        Host {
            store: &self.store,
            queues: &mut self.queues,
            rng: &mut self.rng,
            now,
        }
    }
}

fn at() -> u64 {
    u64::try_from(NOW).unwrap()
}

/// A configuration encrypting `demo/**`, with the fixtures' key service (refreshing every
/// `refresh` seconds) and `replicas` or not.
fn configuration(key_service: Option<u64>, replicas: bool) -> Vec<u8> {
    let mut cfg = json!({
        "registry": {"cluster": "registry"},
        "policy": {"default": "passthrough", "rules": [{"repositories": "demo/**", "action": "encrypt"}]},
        "limits": {"upload_idle_seconds": 60},
    });
    if let Some(refresh) = key_service {
        cfg["key_service"] = json!({
            "cluster": "keyservice", "authority": "keys", "refresh_seconds": refresh,
            "trusted_root": String::from_utf8(initial_root()).unwrap(),
        });
    }
    if replicas {
        cfg["replicas"] = json!({"state_key": common::gateway::STATE_KEY});
    }
    serde_json::to_vec(&cfg).unwrap()
}

fn configured(bytes: &[u8]) -> Plugin {
    let mut plugin = Plugin::new();
    plugin.on_configure(Some(bytes), &|_| None).unwrap();
    plugin
}

#[test]
fn a_configuration_is_taken_or_refused_with_the_line_to_log() {
    let mut plugin = Plugin::new();
    assert_eq!(
        plugin.on_configure(None, &|_| None),
        Err("ocicrypt-filter: no plugin configuration; refusing to start".into())
    );
    let err = plugin
        .on_configure(Some(br#"{"registry":{"cluster":"r"},"nope":1}"#), &|_| None)
        .unwrap_err();
    assert!(
        err.starts_with("ocicrypt-filter: invalid configuration: ") && err.contains("nope"),
        "{err}"
    );
    assert!(plugin.config().is_none());
    // Secrets come from the environment the host answers.
    let with_env = br#"{"registry":{"cluster":"r"},"replicas":{"state_key_env":"K"}}"#;
    assert!(plugin.on_configure(Some(with_env), &|_| None).is_err());
    let key = |name: &str| (name == "K").then(|| common::gateway::STATE_KEY.to_string());
    assert_eq!(
        plugin.on_configure(Some(with_env), &key),
        Ok(vec![
            PluginCommand::Log(Level::Info, "ocicrypt-filter: configuration loaded".into()),
            PluginCommand::SetTickPeriod(Duration::from_secs(2)),
        ])
    );
    assert!(plugin.config().unwrap().state_key.is_some());
}

#[test]
fn the_timer_ticks_at_the_refresh_period_and_at_least_every_heartbeat() {
    for (key_service, seconds) in [(None, 2), (Some(1), 1), (Some(2), 2), (Some(60), 2)] {
        let plugin = configured(&configuration(key_service, false));
        assert_eq!(
            tick_period(plugin.config().unwrap()),
            Duration::from_secs(seconds),
            "{key_service:?}"
        );
    }
}

#[test]
fn a_stream_without_configuration_is_refused() {
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let out = Plugin::new().on_stream_event(&mut stream, envoy.at(at()), |s, env| {
        s.on_request_headers(req("GET", "/v2/").head(), env)
    });
    common::gateway::assert_refused(&out, Code::Unavailable, "no valid configuration");
}

/// Ticks until every upload-record slot was swept once; the commands.
fn sweep_all(plugin: &mut Plugin, envoy: &mut Envoy, now: u64) -> Vec<PluginCommand> {
    let ticks = upload_table::SLOTS / ocicrypt_core::gateway::plugin::SWEEP_PER_TICK;
    (0..ticks)
        .flat_map(|_| plugin.on_tick(envoy.at(now)))
        .collect()
}

#[test]
fn ticks_sweep_idle_upload_records_unless_replicas_keep_them() {
    for replicas in [false, true] {
        let mut plugin = configured(&configuration(None, replicas));
        let mut envoy = Envoy::new();
        let record = UploadRecord::new("demo/app");
        upload_table::save_in(&envoy.store, UUID, &record, at(), 60).unwrap();
        // Not idle yet: kept.
        let early = sweep_all(&mut plugin, &mut envoy, at() + 30);
        assert!(!early.iter().any(|c| matches!(c, PluginCommand::Metric(_))));
        assert!(upload_table::has_in(&envoy.store, UUID, at(), 60));
        let late = sweep_all(&mut plugin, &mut envoy, at() + 61);
        let dropped = vec![PluginCommand::Metric(Metric::UploadState(-1))];
        let metrics: Vec<_> = late
            .into_iter()
            .filter(|c| matches!(c, PluginCommand::Metric(_)))
            .collect();
        assert_eq!(
            metrics,
            if replicas { vec![] } else { dropped },
            "{replicas}"
        );
        assert_eq!(upload_table::has_in(&envoy.store, UUID, at(), 60), replicas);
    }
}

/// Answers the stream's key-service callouts from the fixtures until the request goes on or
/// is refused; every command the stream answered, and the paths fetched.
fn answer_keys(
    plugin: &mut Plugin,
    envoy: &mut Envoy,
    stream: &mut Stream,
    mut out: Vec<Command>,
    answer: impl Fn(&str) -> (u16, Vec<u8>),
) -> (Vec<Command>, Vec<String>) {
    let mut all = Vec::new();
    let mut paths = Vec::new();
    for _ in 0..50 {
        let fetch = out.iter().find_map(|c| match c {
            Command::Dispatch(callout) if callout.cluster == "keyservice" => Some(callout.clone()),
            _ => None,
        });
        all.extend(out);
        let Some(callout) = fetch else {
            return (all, paths);
        };
        assert_eq!(callout.headers[0], (":method".into(), "GET".into()));
        assert_eq!(callout.headers[2], (":authority".into(), "keys".into()));
        assert_eq!((callout.body.as_ref(), callout.timeout_ms), (None, 5000));
        let path = callout.headers[1].1.clone();
        let (status, body) = answer(&path);
        paths.push(path);
        out = plugin.on_stream_event(stream, envoy.at(at()), |s, env| {
            if status == 0 {
                s.on_dispatch_failed(callout.id, env)
            } else {
                s.on_callout(callout.id, &CalloutAnswer::new(status, &[], &body), env)
            }
        });
    }
    panic!("the lookup did not finish");
}

fn post(plugin: &mut Plugin, envoy: &mut Envoy, stream: &mut Stream, r: &Req) -> Vec<Command> {
    plugin.on_stream_event(stream, envoy.at(at()), |s, env| {
        s.on_request_headers(r.head(), env)
    })
}

fn key_metrics(out: &[Command]) -> Vec<KeyMetric> {
    out.iter()
        .filter_map(|c| match c {
            Command::Metric(Metric::Key(k)) => Some(k.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_stream_runs_its_key_lookup_as_its_own_callouts() {
    let mut plugin = configured(&configuration(Some(60), false));
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let upload = req("POST", "/v2/demo/app/blobs/uploads/");
    let first = post(&mut plugin, &mut envoy, &mut stream, &upload);
    // The request waits for the lookup's first fetch: the trusted root's successor.
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first[0], Command::Metric(Metric::Key(KeyMetric::Fetch)));
    let Command::Dispatch(fetch) = &first[1] else {
        panic!("{first:?}")
    };
    assert_eq!(
        fetch.headers,
        [
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), "/metadata/2.root.json".to_string()),
            (":authority".to_string(), "keys".to_string()),
        ]
    );
    assert_eq!(first[2], Command::Pause);
    assert!(stream.awaits(fetch.id));
    let (out, paths) = answer_keys(&mut plugin, &mut envoy, &mut stream, first, |p| {
        serve(&[], p)
    });
    assert!(paths.iter().any(|p| p.ends_with(".demo.json")), "{paths:?}");
    // Verified and published; the request goes on, its callouts resumed.
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    let metrics = key_metrics(&out);
    assert_eq!(
        metrics.iter().filter(|m| **m == KeyMetric::Fetch).count(),
        paths.len()
    );
    assert!(metrics.contains(&KeyMetric::ProjectLookup));
    assert!(!metrics.contains(&KeyMetric::ProjectFailure));
    assert!(envoy.store.get(&keyservice::record_key("demo")).is_some());
    // The next request of the project is answered from the record: no callout.
    let mut next = Stream::new();
    let out = post(&mut plugin, &mut envoy, &mut next, &upload);
    assert!(
        !out.iter().any(|c| matches!(c, Command::Dispatch(_))),
        "{out:?}"
    );
    assert_eq!(out.last(), Some(&Command::Continue));
}

#[test]
fn a_key_fetch_the_host_cannot_dispatch_or_that_gets_no_answer_refuses_503() {
    let mut plugin = configured(&configuration(Some(60), false));
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let first = post(
        &mut plugin,
        &mut envoy,
        &mut stream,
        &req("POST", "/v2/demo/app/blobs/uploads/"),
    );
    let (out, paths) = answer_keys(&mut plugin, &mut envoy, &mut stream, first, |_| {
        (0, Vec::new())
    });
    assert_eq!(paths, ["/metadata/2.root.json"]);
    common::gateway::assert_refused(&out, Code::Unavailable, "no verified recipient keys");
    assert!(out.iter().any(
        |c| matches!(c, Command::Log(Level::Warn, l) if l.starts_with("key service: project demo:"))
    ));
    assert!(key_metrics(&out).contains(&KeyMetric::ProjectFailure));
    // The failure is remembered: the next request is refused without a lookup.
    let mut next = Stream::new();
    let out = post(
        &mut plugin,
        &mut envoy,
        &mut next,
        &req("POST", "/v2/demo/app/blobs/uploads/"),
    );
    assert_eq!(key_metrics(&out), [KeyMetric::FromMemory]);
    common::gateway::assert_refused(&out, Code::Unavailable, "no verified recipient keys");
}

#[test]
fn a_request_refused_while_its_lookup_runs_still_finishes_it() {
    let mut plugin = configured(&configuration(Some(60), false));
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let manifest = req("PUT", "/v2/demo/app/manifests/v1").body(10);
    let first = post(&mut plugin, &mut envoy, &mut stream, &manifest);
    let Some(Command::Dispatch(fetch)) = first.get(1).cloned() else {
        panic!("{first:?}")
    };
    // Trailers on a write to an encrypted repository: refused while the lookup runs.
    let refused = stream.on_request_trailers();
    common::gateway::assert_refused(&refused, Code::BlobUploadInvalid, "trailers");
    let answer = CalloutAnswer::new(200, &[], &serve(&[], "/metadata/2.root.json").1);
    let out = plugin.on_stream_event(&mut stream, envoy.at(at()), |s, env| {
        s.on_callout(fetch.id, &answer, env)
    });
    let (rest, _) = answer_keys(&mut plugin, &mut envoy, &mut stream, out, |p| serve(&[], p));
    // Published for every request; nothing more for this one.
    assert!(envoy.store.get(&keyservice::record_key("demo")).is_some());
    assert!(!rest
        .iter()
        .any(|c| matches!(c, Command::Continue | Command::Reply(_) | Command::Pause)));
}

/// Answers the plugin's refresh callouts from the fixtures (`None`: every one fails to
/// dispatch); the commands and the paths fetched.
fn answer_refresh(
    plugin: &mut Plugin,
    envoy: &mut Envoy,
    mut out: Vec<PluginCommand>,
    now: u64,
    good: bool,
) -> (Vec<PluginCommand>, Vec<String>) {
    let mut all = Vec::new();
    let mut paths = Vec::new();
    for _ in 0..50 {
        let fetch = out.iter().find_map(|c| match c {
            PluginCommand::Dispatch(callout) => Some(callout.clone()),
            _ => None,
        });
        all.extend(out);
        let Some(callout) = fetch else {
            return (all, paths);
        };
        assert_eq!(callout.cluster, "keyservice");
        let path = callout.headers[1].1.clone();
        paths.push(path.clone());
        out = if good {
            let (status, body) = serve(&[], &path);
            let answer = CalloutAnswer::new(status, &[], &body);
            plugin.on_callout(callout.id, &answer, &envoy.store, now)
        } else {
            plugin.on_dispatch_failed(callout.id, &envoy.store, now)
        };
    }
    panic!("the refresh did not finish");
}

#[test]
fn the_timer_refreshes_the_projects_in_use_over_callouts_once_per_period() {
    let mut plugin = configured(&configuration(Some(60), false));
    let mut envoy = Envoy::new();
    // Nothing in use: a tick fetches nothing.
    let idle = plugin.on_tick(envoy.at(at()));
    assert!(!idle.iter().any(|c| matches!(c, PluginCommand::Dispatch(_))));
    let mut stream = Stream::new();
    let first = post(
        &mut plugin,
        &mut envoy,
        &mut stream,
        &req("POST", "/v2/demo/app/blobs/uploads/"),
    );
    answer_keys(&mut plugin, &mut envoy, &mut stream, first, |p| {
        serve(&[], p)
    });
    let later = at() + 61;
    let tick = plugin.on_tick(envoy.at(later));
    let (out, paths) = answer_refresh(&mut plugin, &mut envoy, tick, later, true);
    assert!(paths.iter().any(|p| p.ends_with(".demo.json")), "{paths:?}");
    assert!(out.contains(&PluginCommand::Metric(Metric::Key(
        KeyMetric::ProjectLookup
    ))));
    assert!(out.iter().any(|c| matches!(c, PluginCommand::Metric(Metric::Key(KeyMetric::TufVersion(role, _))) if role == "timestamp")));
    assert!(out.iter().any(|c| matches!(
        c,
        PluginCommand::Log(Level::Info, l)
            if l.starts_with(&format!("{PREFIX}key service refresh: project demo: verified"))
    )));
    // Another worker ticking in the same period leaves it to the one that refreshed.
    let mut other = configured(&configuration(Some(60), false));
    let tick = other.on_tick(envoy.at(later + 1));
    assert!(!tick.iter().any(|c| matches!(c, PluginCommand::Dispatch(_))));
    // An answer to a callout the plugin does not wait for is dropped.
    let stray = ocicrypt_core::gateway::CalloutId(999);
    assert!(plugin
        .on_callout(
            stray,
            &CalloutAnswer::new(200, &[], b""),
            &envoy.store,
            later
        )
        .is_empty());
}

#[test]
fn a_refresh_whose_fetches_cannot_be_dispatched_logs_the_failure() {
    let mut plugin = configured(&configuration(Some(60), false));
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let first = post(
        &mut plugin,
        &mut envoy,
        &mut stream,
        &req("POST", "/v2/demo/app/blobs/uploads/"),
    );
    answer_keys(&mut plugin, &mut envoy, &mut stream, first, |p| {
        serve(&[], p)
    });
    let later = at() + 61;
    let tick = plugin.on_tick(envoy.at(later));
    let (out, paths) = answer_refresh(&mut plugin, &mut envoy, tick, later, false);
    assert_eq!(paths.len(), 1, "{paths:?}");
    assert!(out.contains(&PluginCommand::Metric(Metric::Key(
        KeyMetric::ProjectFailure
    ))));
    assert!(out.iter().any(|c| matches!(
        c,
        PluginCommand::Log(Level::Warn, l)
            if l.starts_with(&format!("{PREFIX}key service refresh: project demo:"))
    )));
}

#[test]
fn a_stream_end_gives_back_its_manifest_budget() {
    let mut plugin = configured(&configuration(Some(60), false));
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let upload = req("POST", "/v2/demo/app/blobs/uploads/");
    let first = post(&mut plugin, &mut envoy, &mut stream, &upload);
    answer_keys(&mut plugin, &mut envoy, &mut stream, first, |p| {
        serve(&[], p)
    });
    let mut push = Stream::new();
    let manifest = req("PUT", "/v2/demo/app/manifests/v1").body(10);
    let out = post(&mut plugin, &mut envoy, &mut push, &manifest);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    assert!(push.manifest_reserved > 0);
    assert_eq!(plugin.held_manifest_bytes(), push.manifest_reserved);
    assert_eq!(plugin.on_stream_end(&mut push, &envoy.store), []);
    assert_eq!(plugin.held_manifest_bytes(), 0);
}

#[test]
fn a_stream_start_lists_the_worker_as_a_helper_or_says_why_not() {
    let mut plugin = configured(&configuration(None, false));
    let mut envoy = Envoy::new();
    assert_eq!(plugin.on_stream_start(envoy.at(at())), []);
    assert_eq!(envoy.queues.0.borrow().queues.len(), 2);
    assert!(envoy
        .store
        .get(ocicrypt_core::gateway::prefetch::HELPERS_KEY)
        .is_some());
    let mut refused = Envoy::new();
    refused.queues.0.borrow_mut().refuse = true;
    let mut lonely = configured(&configuration(None, false));
    assert_eq!(
        lonely.on_stream_start(refused.at(at())),
        [PluginCommand::Log(
            Level::Warn,
            ocicrypt_core::gateway::prefetch::NO_QUEUES.into()
        )]
    );
}

/// A host whose streams run on several threads keeps the plugin's parts apart (the native
/// module): the configuration from `configure`, the key records it lends per call through
/// `WorkerKeys`, the `Timer`. For the same events it gets the same commands as a `Plugin`.
#[test]
fn a_host_holding_the_parts_apart_gets_the_plugins_commands() {
    use ocicrypt_core::gateway::plugin::{configure, Timer};
    use ocicrypt_core::gateway::{Env, WorkerKeys};
    use ocicrypt_core::keys::records::{KeyCommand, KeyWorker};
    use std::cell::Cell;

    let bytes = configuration(Some(60), false);
    let upload = req("POST", "/v2/demo/app/blobs/uploads/");
    // The plugin.
    let mut plugin = Plugin::new();
    let configured_plugin = plugin.on_configure(Some(&bytes), &|_| None).unwrap();
    let mut envoy = Envoy::new();
    let mut stream = Stream::new();
    let first = post(&mut plugin, &mut envoy, &mut stream, &upload);
    let (plugin_stream, _) = answer_keys(&mut plugin, &mut envoy, &mut stream, first, |p| {
        serve(&[], p)
    });
    let tick = plugin.on_tick(envoy.at(at() + 61));
    let (plugin_refresh, _) = answer_refresh(&mut plugin, &mut envoy, tick, at() + 61, true);

    // The parts.
    let (config, configured_parts) = configure(Some(&bytes), &|_| None).unwrap();
    assert_eq!(configured_parts, configured_plugin);
    let mut keys = KeyWorker::new();
    let mut timer = Timer::default();
    let store = MapStore::default();
    let held = Cell::new(0);
    let mut rng = StdRng::seed_from_u64(17);
    let mut stream = Stream::new();
    // One stream event: the keys lent per call, their commands taken after it, first.
    let mut event = |stream: &mut Stream,
                     keys: &mut KeyWorker,
                     e: &dyn Fn(&mut Stream, &mut Env) -> Vec<Command>| {
        let mut lent = WorkerKeys {
            worker: keys,
            config: &config,
            store: &store,
            now: NOW,
        };
        let mut env = Env {
            config: &config,
            store: &store,
            keys: &mut lent,
            held_manifest_bytes: &held,
            now: at(),
            rng: &mut rng,
            keystream: None,
            hashing: None,
        };
        let out = e(stream, &mut env);
        let mut all: Vec<Command> = keys
            .take_commands()
            .into_iter()
            .map(|c| match c {
                KeyCommand::Metric(m) => Command::Metric(Metric::Key(m)),
                KeyCommand::Log(l, line) => Command::Log(
                    match l {
                        ocicrypt_core::keys::records::KeyLevel::Info => Level::Info,
                        ocicrypt_core::keys::records::KeyLevel::Warn => Level::Warn,
                    },
                    line,
                ),
            })
            .collect();
        all.extend(out);
        all
    };
    let mut out = event(&mut stream, &mut keys, &|s, env| {
        s.on_request_headers(upload.head(), env)
    });
    let mut parts_stream = Vec::new();
    while let Some(callout) = out.iter().find_map(|c| match c {
        Command::Dispatch(c) => Some(c.clone()),
        _ => None,
    }) {
        parts_stream.extend(out);
        let (status, body) = serve(&[], &callout.headers[1].1);
        let answer = CalloutAnswer::new(status, &[], &body);
        out = event(&mut stream, &mut keys, &|s, env| {
            s.on_callout(callout.id, &answer, env)
        });
    }
    parts_stream.extend(out);
    assert_eq!(parts_stream, plugin_stream);

    let mut out = timer.on_tick(&config, &mut keys, &store, at() + 61);
    let mut parts_refresh = Vec::new();
    while let Some(callout) = out.iter().find_map(|c| match c {
        PluginCommand::Dispatch(c) => Some(c.clone()),
        _ => None,
    }) {
        parts_refresh.extend(out);
        let (status, body) = serve(&[], &callout.headers[1].1);
        let answer = CalloutAnswer::new(status, &[], &body);
        out = timer.on_callout(
            callout.id,
            &answer,
            Some(&config),
            &mut keys,
            &store,
            at() + 61,
        );
    }
    parts_refresh.extend(out);
    assert_eq!(parts_refresh, plugin_refresh);
    assert!(parts_refresh
        .iter()
        .any(|c| matches!(c, PluginCommand::Dispatch(_))));
}
