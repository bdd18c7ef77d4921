//! `ocicrypt-rotate`: brings every encrypted image of a project stored in a registry in line
//! with the project's recipients as verified from the TUF key service (issue 18).
//!
//! ```text
//! ocicrypt-rotate --project P --key PRIVATE.pem [--key …] [--dry-run]
//!                 [--state DIR]                      local gateway state (scripts/run's .run/)
//!                 [--config FILE]                    JSON: the options below by name
//!                 [--registry URL] [--registry-creds USER:PASSWORD] [--registry-ca PEM]
//!                 [--keyservice URL] [--keyservice-ca PEM] [--trusted-root root.json]
//!                 [--metadata-path /metadata] [--targets-path /targets]
//!                 [--state-key-file FILE | --no-state-key]
//!                 [--jobs N]                         repositories done at once (default 1)
//! ```
//!
//! For each layer: wrapped to exactly the target recipients → kept; to a subset of them →
//! its key re-wrapped (no layer byte moves); to anyone else, or to recipients it cannot tell →
//! re-encrypted with a fresh key, streamed. Manifests, indexes, referrers, tags and the
//! gateway's ledger records are then pointed at the result. The summary goes to standard
//! output as one JSON line; progress and problems to standard error. Exit status 0 when
//! everything is in line (or would be, with `--dry-run`), 1 when a layer could not be opened
//! or something failed (what is left untouched is listed), 2 on a usage error.
//!
//! The registry is spoken to directly, never through the gateway, with credentials that may
//! push to the project's repositories.

mod keys;
mod registry;
mod rotate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ocicrypt_core::format::keywrap::PrivateKey;
use zeroize::Zeroizing;

use crate::registry::{Credentials, Registry};
use crate::rotate::{RepoRun, Settings, Stats, Target};

/// Environment variable holding the replicas' state key (base64), as the gateway's.
const STATE_KEY_ENV: &str = "OCICRYPT_STATE_KEY";
/// Environment variable holding `USER:PASSWORD` for the registry.
const CREDS_ENV: &str = "ROTATE_REGISTRY_CREDS";

#[derive(Default)]
struct Args {
    project: Option<String>,
    keys: Vec<PathBuf>,
    dry_run: bool,
    delete_replaced: bool,
    state: Option<PathBuf>,
    config: Option<PathBuf>,
    registry: Option<String>,
    registry_creds: Option<String>,
    registry_ca: Option<PathBuf>,
    keyservice: Option<String>,
    keyservice_ca: Option<PathBuf>,
    trusted_root: Option<PathBuf>,
    metadata_path: Option<String>,
    targets_path: Option<String>,
    state_key_file: Option<PathBuf>,
    no_state_key: bool,
    jobs: usize,
}

fn usage() -> String {
    "usage: ocicrypt-rotate --project P --key PRIVATE.pem [--key …] [--dry-run] \
     [--delete-replaced] [--state DIR] \
     [--config FILE] [--registry URL] [--registry-creds USER:PASSWORD] [--registry-ca PEM] \
     [--keyservice URL] [--keyservice-ca PEM] [--trusted-root root.json] \
     [--metadata-path P] [--targets-path P] [--state-key-file FILE | --no-state-key] [--jobs N]"
        .to_owned()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        jobs: 1,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--project" => args.project = Some(value()?),
            "--key" => args.keys.push(PathBuf::from(value()?)),
            "--dry-run" => args.dry_run = true,
            "--delete-replaced" => args.delete_replaced = true,
            "--state" => args.state = Some(PathBuf::from(value()?)),
            "--config" => args.config = Some(PathBuf::from(value()?)),
            "--registry" => args.registry = Some(value()?),
            "--registry-creds" => args.registry_creds = Some(value()?),
            "--registry-ca" => args.registry_ca = Some(PathBuf::from(value()?)),
            "--keyservice" => args.keyservice = Some(value()?),
            "--keyservice-ca" => args.keyservice_ca = Some(PathBuf::from(value()?)),
            "--trusted-root" => args.trusted_root = Some(PathBuf::from(value()?)),
            "--metadata-path" => args.metadata_path = Some(value()?),
            "--targets-path" => args.targets_path = Some(value()?),
            "--state-key-file" => args.state_key_file = Some(PathBuf::from(value()?)),
            "--no-state-key" => args.no_state_key = true,
            "--jobs" => {
                args.jobs = value()?
                    .parse()
                    .map_err(|_| "--jobs takes a number of repositories at once".to_owned())?
            }
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other}\n{}", usage())),
        }
    }
    Ok(args)
}

/// Fills options the command line left out from `--config` (JSON, the options' names with
/// `_` for `-`), then from the local gateway's state directory.
fn apply_config(args: &mut Args) -> Result<(), String> {
    let Some(path) = &args.config else {
        return Ok(());
    };
    let text = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for (k, v) in obj {
        let s = v
            .as_str()
            .ok_or_else(|| format!("{}: {k} must be a string", path.display()))?
            .to_owned();
        let file = || Some(base.join(&s));
        match k.as_str() {
            "registry" => args.registry = args.registry.take().or(Some(s)),
            "registry_creds_env" => {
                if args.registry_creds.is_none() {
                    args.registry_creds = std::env::var(&s).ok();
                }
            }
            "registry_ca" => args.registry_ca = args.registry_ca.take().or_else(file),
            "keyservice" => args.keyservice = args.keyservice.take().or(Some(s)),
            "keyservice_ca" => args.keyservice_ca = args.keyservice_ca.take().or_else(file),
            "trusted_root" => args.trusted_root = args.trusted_root.take().or_else(file),
            "metadata_path" => args.metadata_path = args.metadata_path.take().or(Some(s)),
            "targets_path" => args.targets_path = args.targets_path.take().or(Some(s)),
            "state_key_file" => args.state_key_file = args.state_key_file.take().or_else(file),
            other => {
                return Err(format!(
                    "{}: unknown option {other:?} (registry, registry_creds_env, registry_ca, \
                     keyservice, keyservice_ca, trusted_root, metadata_path, targets_path, \
                     state_key_file)",
                    path.display()
                ))
            }
        }
    }
    Ok(())
}

/// The local gateway's registry address: `addr:` in `<state>/registry.yml`.
fn state_registry(state: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state.join("registry.yml")).ok()?;
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("addr:"))
        .map(|a| format!("http://{}", a.trim().trim_matches('\'').trim_matches('"')))
}

/// The local key service's address: the `listen … ssl;` line of its nginx configuration.
fn state_keyservice(state: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state.join("keyservice-nginx").join("nginx.conf")).ok()?;
    text.lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("listen ")?
                .strip_suffix(" ssl;")
                .map(str::to_owned)
        })
        .map(|addr| format!("https://{addr}"))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

fn state_key(args: &Args, state: &Path) -> Result<Option<Zeroizing<[u8; 32]>>, String> {
    if args.no_state_key {
        return Ok(None);
    }
    let text = match (&args.state_key_file, std::env::var(STATE_KEY_ENV)) {
        (Some(path), _) => Zeroizing::new(String::from_utf8_lossy(&read(path)?).into_owned()),
        (None, Ok(v)) => Zeroizing::new(v),
        (None, Err(_)) => match std::fs::read(state.join("state-key")) {
            Ok(bytes) => Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned()),
            Err(_) => return Ok(None),
        },
    };
    let bytes = Zeroizing::new(
        STANDARD
            .decode(text.trim())
            .map_err(|_| "the state key is not base64".to_owned())?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "the state key is not 32 bytes".to_owned())?;
    Ok(Some(Zeroizing::new(key)))
}

fn summary_json(project: &str, dry_run: bool, stats: &Stats, failures: usize, secs: f64) -> String {
    serde_json::json!({
        "project": project,
        "dry_run": dry_run,
        "repositories": stats.repositories,
        "manifests": stats.manifests,
        "layers": stats.layers,
        "unchanged": stats.unchanged,
        "rewrapped": stats.rewrapped,
        "reencrypted": stats.reencrypted,
        "resumed": stats.resumed,
        "failed": stats.failed,
        "bytes_downloaded": stats.bytes_downloaded,
        "bytes_uploaded": stats.bytes_uploaded,
        "manifests_written": stats.manifests_written,
        "tags_repointed": stats.tags_repointed,
        "ledger_updated": stats.ledger_updated,
        "ledger_stale": stats.ledger_stale,
        "referrers_repointed": stats.referrers_repointed,
        "manifests_deleted": stats.manifests_deleted,
        "problems": failures,
        "seconds": (secs * 1000.0).round() / 1000.0,
    })
    .to_string()
}

fn add(total: &mut Stats, s: &Stats) {
    total.repositories += s.repositories;
    total.manifests += s.manifests;
    total.layers += s.layers;
    total.unchanged += s.unchanged;
    total.rewrapped += s.rewrapped;
    total.reencrypted += s.reencrypted;
    total.resumed += s.resumed;
    total.failed += s.failed;
    total.bytes_downloaded += s.bytes_downloaded;
    total.bytes_uploaded += s.bytes_uploaded;
    total.manifests_written += s.manifests_written;
    total.tags_repointed += s.tags_repointed;
    total.ledger_updated += s.ledger_updated;
    total.ledger_stale += s.ledger_stale;
    total.referrers_repointed += s.referrers_repointed;
    total.manifests_deleted += s.manifests_deleted;
}

fn run() -> Result<bool, String> {
    let started = Instant::now();
    let mut args = parse_args()?;
    apply_config(&mut args)?;
    let project = args.project.clone().ok_or("--project is required")?;
    if project.is_empty() || project.contains('/') {
        return Err(format!(
            "--project {project:?}: a project is one path segment"
        ));
    }
    if args.keys.is_empty() {
        return Err("--key is required (a private key that opens the project's layers)".into());
    }
    let state = args.state.clone().unwrap_or_else(|| PathBuf::from(".run"));
    let registry_url = args
        .registry
        .clone()
        .or_else(|| state_registry(&state))
        .ok_or("--registry is required (no local gateway state found)")?;
    let keyservice_url = args
        .keyservice
        .clone()
        .or_else(|| state_keyservice(&state))
        .ok_or("--keyservice is required (no local gateway state found)")?;
    let keyservice_ca = args.keyservice_ca.clone().or_else(|| {
        let p = state.join("keyservice-tls").join("ca.crt");
        p.exists().then_some(p)
    });
    let trusted_root = args.trusted_root.clone().unwrap_or_else(|| {
        state
            .join("keyservice")
            .join("metadata")
            .join("1.root.json")
    });
    let keys = args
        .keys
        .iter()
        .map(|p| {
            let pem = Zeroizing::new(String::from_utf8_lossy(&read(p)?).into_owned());
            PrivateKey::from_pkcs8_pem(&pem).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let state_key = state_key(&args, &state)?;
    let creds = args
        .registry_creds
        .clone()
        .or_else(|| std::env::var(CREDS_ENV).ok())
        .map(|c| {
            c.split_once(':')
                .map(|(u, p)| (u.to_owned(), p.to_owned()))
                .ok_or("registry credentials must be USER:PASSWORD".to_owned())
        })
        .transpose()?;

    // 1. The target: the project's recipients as TUF verifies them against the pinned root.
    let ks_ca = keyservice_ca.as_deref().map(read).transpose()?;
    let ks_agent = registry::agent(ks_ca.as_deref(), 0)?;
    let ks = keys::KeyService {
        url: keyservice_url.clone(),
        metadata_path: args.metadata_path.clone().unwrap_or("/metadata".into()),
        targets_path: args.targets_path.clone().unwrap_or("/targets".into()),
        trusted_root: read(&trusted_root)?,
    };
    let (recipients, versions) = keys::verified_recipients(&ks_agent, &ks, &project)?;
    let target = Target::new(recipients);
    eprintln!(
        "rotate: project {project}: {} verified recipient(s) [{}] from {keyservice_url} ({})",
        target.recipients.len(),
        target
            .recipients
            .iter()
            .map(|r| r.describe())
            .collect::<Vec<_>>()
            .join(", "),
        versions
            .iter()
            .map(|(role, v)| format!("{role} v{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if state_key.is_none() {
        eprintln!(
            "rotate: no state key ({STATE_KEY_ENV}, --state-key-file): the gateway's ledger \
             records are neither read nor updated"
        );
    }

    // 2. Every repository of the project.
    let reg_ca = args.registry_ca.as_deref().map(read).transpose()?;
    let reg_agent = registry::agent(reg_ca.as_deref(), 5)?;
    let creds = Credentials { basic: creds };
    let mut reg = Registry::new(reg_agent.clone(), &registry_url, creds.clone());
    let prefix = format!("{project}/");
    let repos: Vec<String> = reg
        .catalog()?
        .into_iter()
        .filter(|r| r.starts_with(&prefix))
        .collect();
    let settings = Settings {
        keys: &keys,
        target: &target,
        state_key: state_key.as_deref(),
        dry_run: args.dry_run,
        delete_replaced: args.delete_replaced,
    };
    // Repositories are independent (the ledger and every blob are per repository), so
    // `--jobs` workers take them one at a time, each with its own connection and tokens.
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(Stats, Vec<String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| {
                let mut reg = Registry::new(reg_agent.clone(), &registry_url, creds.clone());
                while let Some(repo) = repos.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut run = RepoRun::new(&mut reg, repo, &settings);
                    let mut problems = Vec::new();
                    if let Err(e) = run.run() {
                        problems.push(format!("{repo}: {e}"));
                    }
                    run.stats.repositories = 1;
                    for note in &run.notes {
                        eprintln!("rotate: {note}");
                    }
                    problems.extend(run.problems.iter().cloned());
                    let stats = run.stats.clone();
                    if let Ok(mut all) = results.lock() {
                        all.push((stats, problems));
                    }
                }
            });
        }
    });
    let mut total = Stats::default();
    let mut problems: Vec<String> = Vec::new();
    let results = results
        .into_inner()
        .map_err(|_| "a worker failed".to_owned())?;
    if results.len() != repos.len() {
        problems.push(format!(
            "{} of {} repositories were not done",
            repos.len().saturating_sub(results.len()),
            repos.len()
        ));
    }
    for (stats, p) in results {
        add(&mut total, &stats);
        problems.extend(p);
    }

    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "rotate: {}{} repositories, {} manifests, {} layers: {} unchanged, {} re-wrapped, \
         {} re-encrypted, {} left untouched; {} bytes down, {} up; {} tags repointed, \
         {} ledger records updated, {} stale; {secs:.1} s",
        if args.dry_run { "(dry run) " } else { "" },
        total.repositories,
        total.manifests,
        total.layers,
        total.unchanged,
        total.rewrapped,
        total.reencrypted,
        total.failed,
        total.bytes_downloaded,
        total.bytes_uploaded,
        total.tags_repointed,
        total.ledger_updated,
        total.ledger_stale,
    );
    for p in &problems {
        eprintln!("rotate: PROBLEM: {p}");
    }
    println!(
        "{}",
        summary_json(&project, args.dry_run, &total, problems.len(), secs)
    );
    Ok(problems.is_empty() && total.failed == 0)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rotate: {e}");
            ExitCode::from(2)
        }
    }
}
