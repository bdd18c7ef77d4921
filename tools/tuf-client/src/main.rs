//! `tuf-client`: the client-under-test CLI of the TUF conformance suite
//! (theupdateframework/tuf-conformance, `CLIENT-CLI.md`), built on `ocicrypt_core::tuf`.
//!
//! ```text
//! tuf-client --metadata-dir MD init TRUSTED_ROOT
//! tuf-client --metadata-dir MD --metadata-url URL refresh
//! tuf-client --metadata-dir MD --metadata-url URL --target-name T [--target-name T2 …] \
//!            --target-dir TD --target-base-url URL download
//! ```
//!
//! Exit status 0 on success, 1 on any failure. `MD` holds the exact bytes of the trusted
//! metadata as `<role>.json` (role names percent-encoded); `TD` holds verified targets under
//! their percent-encoded target path. Time is the system clock (the suite uses `faketime`).

mod http;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use ocicrypt_core::tuf::{
    decode_role_name, encode_role_name, Fetch, FetchBase, MetadataCache, Outcome, Progress,
    TufError, Updater, UpdaterConfig,
};

#[derive(Default)]
struct Args {
    metadata_dir: Option<PathBuf>,
    metadata_url: Option<String>,
    target_names: Vec<String>,
    target_dir: Option<PathBuf>,
    target_base_url: Option<String>,
    verbose: u8,
    positional: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--metadata-dir" => args.metadata_dir = Some(PathBuf::from(value("--metadata-dir")?)),
            "--metadata-url" => args.metadata_url = Some(value("--metadata-url")?),
            "--target-name" => args.target_names.push(value("--target-name")?),
            "--target-dir" => args.target_dir = Some(PathBuf::from(value("--target-dir")?)),
            "--target-base-url" => args.target_base_url = Some(value("--target-base-url")?),
            "-v" | "--verbose" => args.verbose = args.verbose.saturating_add(1),
            "-vv" => args.verbose = args.verbose.saturating_add(2),
            "-h" | "--help" => return Err(usage()),
            other if other.starts_with('-') => {
                return Err(format!("unknown option {other}\n{}", usage()))
            }
            _ => args.positional.push(arg),
        }
    }
    Ok(args)
}

fn usage() -> String {
    "usage: tuf-client --metadata-dir MD init TRUSTED_ROOT\n       \
     tuf-client --metadata-dir MD --metadata-url URL refresh\n       \
     tuf-client --metadata-dir MD --metadata-url URL --target-name T --target-dir TD --target-base-url URL download"
        .to_owned()
}

fn with_slash(url: &str) -> String {
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

/// Metadata directory contents: the cache plus the file names found, to delete files the
/// client stopped trusting.
fn load_cache(dir: &Path) -> Result<(MetadataCache, BTreeMap<String, Vec<u8>>), String> {
    let root = fs::read(dir.join("root.json"))
        .map_err(|e| format!("read {}/root.json: {e}", dir.display()))?;
    let mut cache = MetadataCache::new(root);
    let mut on_disk = BTreeMap::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let Some(role) = decode_role_name(stem) else {
            continue;
        };
        let Ok(bytes) = fs::read(entry.path()) else {
            continue;
        };
        on_disk.insert(role.clone(), bytes.clone());
        cache.insert(&role, bytes);
    }
    Ok((cache, on_disk))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, bytes).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

/// Persist the trusted metadata: write what changed, delete what is no longer trusted.
fn persist(
    dir: &Path,
    cache: &MetadataCache,
    on_disk: &BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let files = cache.files();
    for (role, bytes) in &files {
        if on_disk.get(*role).map(Vec::as_slice) != Some(*bytes) {
            write_atomic(&dir.join(format!("{}.json", encode_role_name(role))), bytes)?;
        }
    }
    for role in on_disk.keys() {
        if !files.iter().any(|(r, _)| r == role) {
            let path = dir.join(format!("{}.json", encode_role_name(role)));
            fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

struct Client {
    updater: Updater,
    metadata_url: String,
    target_base_url: Option<String>,
    verbose: u8,
}

impl Client {
    /// Run the updater's fetch loop until its job finishes.
    fn drive(&mut self, mut progress: Progress) -> Result<Outcome, String> {
        loop {
            let fetch: Fetch = match progress {
                Progress::Done(outcome) => return Ok(outcome),
                Progress::Fetch(fetch) => fetch,
            };
            let base = match fetch.base {
                FetchBase::Metadata => self.metadata_url.clone(),
                FetchBase::Targets => self
                    .target_base_url
                    .clone()
                    .ok_or("--target-base-url is required")?,
            };
            let url = format!("{base}{}", fetch.path);
            let (status, body) = match http::get(&url, fetch.max_len) {
                Ok(r) => (r.status, r.body),
                Err(e) => {
                    eprintln!("tuf-client: GET {url}: {e}");
                    (0, Vec::new())
                }
            };
            if self.verbose > 0 {
                eprintln!("tuf-client: GET {url} -> {status} ({} bytes)", body.len());
            }
            progress = self.updater.on_response(status, &body).map_err(describe)?;
        }
    }
}

fn describe(e: TufError) -> String {
    let category = match &e {
        TufError::Repository(_) => "repository error",
        TufError::Download(_) => "download error",
        TufError::TargetNotFound { .. } => "target not found",
        TufError::OutOfOrder { .. } => "client error",
    };
    format!("{category}: {e}")
}

fn now() -> Result<i64, String> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock before 1970: {e}"))?;
    i64::try_from(d.as_secs()).map_err(|e| e.to_string())
}

fn refresh(client: &mut Client) -> Result<(), String> {
    let progress = client.updater.start_refresh(now()?).map_err(describe)?;
    client.drive(progress).map(|_| ())
}

fn download(client: &mut Client, names: &[String], target_dir: &Path) -> Result<(), String> {
    refresh(client)?;
    for name in names {
        let progress = client.updater.start_resolve(name).map_err(describe)?;
        let Outcome::Resolved(target) = client.drive(progress)? else {
            return Err(format!("no target info for {name}"));
        };
        let local = target_dir.join(encode_role_name(&target.path));
        // Artifact cache: a local copy that still matches the metadata is not fetched again.
        if fs::read(&local).is_ok_and(|bytes| target.verify(&bytes).is_ok()) {
            if client.verbose > 0 {
                eprintln!("tuf-client: {name} is up to date in {}", local.display());
            }
            continue;
        }
        let progress = client.updater.start_download(target).map_err(describe)?;
        let Outcome::Downloaded { bytes, .. } = client.drive(progress)? else {
            return Err(format!("no content for {name}"));
        };
        let tmp = local.with_extension("part");
        fs::write(&tmp, &bytes).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &local).map_err(|e| format!("rename to {}: {e}", local.display()))?;
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let metadata_dir = args
        .metadata_dir
        .clone()
        .ok_or("--metadata-dir is required")?;
    let command = args
        .positional
        .first()
        .map(String::as_str)
        .ok_or_else(usage)?;
    match command {
        "init" => {
            let root = args.positional.get(1).ok_or("init needs TRUSTED_ROOT")?;
            fs::create_dir_all(&metadata_dir).map_err(|e| e.to_string())?;
            let bytes = fs::read(root).map_err(|e| format!("read {root}: {e}"))?;
            write_atomic(&metadata_dir.join("root.json"), &bytes)
        }
        "refresh" | "download" => {
            let metadata_url = with_slash(
                args.metadata_url
                    .as_deref()
                    .ok_or("--metadata-url is required")?,
            );
            let (cache, on_disk) = load_cache(&metadata_dir)?;
            let mut client = Client {
                updater: Updater::new(cache, UpdaterConfig::default()),
                metadata_url,
                target_base_url: args.target_base_url.as_deref().map(with_slash),
                verbose: args.verbose,
            };
            let result = if command == "refresh" {
                refresh(&mut client)
            } else {
                let target_dir = args.target_dir.clone().ok_or("--target-dir is required")?;
                if args.target_names.is_empty() {
                    return Err("--target-name is required".to_owned());
                }
                download(&mut client, &args.target_names, &target_dir)
            };
            // Everything verified so far is persisted, also when a later step failed (5.3.8,
            // 5.4.5, 5.5.7, 5.6.6).
            persist(&metadata_dir, client.updater.cache(), &on_disk)?;
            result
        }
        other => Err(format!("unknown command {other}\n{}", usage())),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tuf-client: {e}");
            ExitCode::FAILURE
        }
    }
}
