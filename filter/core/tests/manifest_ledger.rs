//! The ledger kept in the registry (issue 11, finding 5): records only the gateway can write
//! (a MAC under a key derived from the replicas' state key), read back only for exactly the
//! repository and digest they were written for; client manifests stored under a ledger tag
//! never read back as blob records; a bounded number of lookups per manifest.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;

use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::{
    entry_from_stored, entry_from_stored_authenticated, is_ledger_record, ledger_manifest,
    ledger_manifest_authenticated, read_stored, LedgerEntry, StoredEntryError, ANNOTATION_MAC,
    DEFAULT_MAX_LEDGER_LOOKUPS, LEDGER_ARTIFACT_TYPE, LEDGER_LAYER_TYPE,
};
use ocicrypt_core::distribution::manifest::{
    referenced_digests, referenced_digests_bounded, ManifestError,
};
use ocicrypt_core::error::Code;
use serde_json::{json, Value};

const KEY: [u8; 32] = [0x5a; 32];
const REPO: &str = "demo/app";

fn plaintext() -> Digest {
    Digest::of(b"plaintext layer")
}

fn entry() -> LedgerEntry {
    LedgerEntry {
        encrypted_digest: Digest::of(b"ciphertext layer"),
        size: 4242,
        annotations: BTreeMap::from([
            (
                "org.opencontainers.image.enc.keys.jwe".to_string(),
                "eyJwcm90ZWN0ZWQiOiJ4In0=".to_string(),
            ),
            (
                "org.opencontainers.image.enc.pubopts".to_string(),
                "eyJjaXBoZXIiOiJ4In0=".to_string(),
            ),
        ]),
        media_type: None,
        recipients: Some("3f9a0c".to_string()),
    }
}

fn record() -> Vec<u8> {
    ledger_manifest_authenticated(&KEY, REPO, &plaintext(), &entry())
}

fn read(body: &[u8]) -> Option<LedgerEntry> {
    entry_from_stored_authenticated(&KEY, REPO, &plaintext(), body)
}

#[test]
fn authentic_records_round_trip() {
    let body = record();
    assert_eq!(read(&body), Some(entry()));
    assert_eq!(read_stored(&KEY, REPO, &plaintext(), &body), Ok(entry()));
    assert!(is_ledger_record(&body));

    // Still an OCI manifest the registry accepts, whose only blob is the empty descriptor: it
    // names the ciphertext in annotations, so garbage collection keeps the ciphertext only for
    // the images that use it (issue 19).
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["artifactType"], LEDGER_ARTIFACT_TYPE);
    let empty = json!({"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": Digest::of(b"{}").to_string(), "size": 2});
    assert_eq!(doc["config"], empty);
    let layers = doc["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    for field in ["mediaType", "digest", "size"] {
        assert_eq!(layers[0][field], empty[field], "{field}");
    }
    assert_eq!(
        layers[0]["annotations"][CIPHERTEXT],
        entry().encrypted_digest.to_string()
    );
    assert_eq!(layers[0]["annotations"][SIZE], "4242");
    assert_eq!(
        referenced_digests(&body),
        [Digest::of(b"{}")],
        "the record names no blob but the empty descriptor"
    );
    let mac = doc["annotations"][ANNOTATION_MAC].as_str().unwrap();
    assert_eq!(mac.len(), 64);
    assert!(mac
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    // Deterministic, and bound to every input: another key, repository or digest gives
    // another MAC.
    assert_eq!(record(), body);
    let mac_of = |b: &[u8]| -> String {
        let d: Value = serde_json::from_slice(b).unwrap();
        d["annotations"][ANNOTATION_MAC]
            .as_str()
            .unwrap()
            .to_string()
    };
    for other in [
        ledger_manifest_authenticated(&[0x5b; 32], REPO, &plaintext(), &entry()),
        ledger_manifest_authenticated(&KEY, "demo/app2", &plaintext(), &entry()),
        ledger_manifest_authenticated(&KEY, REPO, &Digest::of(b"other"), &entry()),
    ] {
        assert_ne!(mac_of(&other), mac);
    }

    // An entry without recipients or annotations round-trips too.
    let bare = LedgerEntry {
        annotations: BTreeMap::new(),
        recipients: None,
        ..entry()
    };
    let body = ledger_manifest_authenticated(&KEY, REPO, &plaintext(), &bare);
    assert_eq!(read(&body), Some(bare));

    // A manifest pushed by digest and stored under its new digest: its record keeps the
    // stored media type and reads back as a manifest entry, naming the stored manifest in
    // annotations only (garbage collection keeps it for the index that names it, not for
    // the record).
    let stored = LedgerEntry {
        annotations: BTreeMap::new(),
        recipients: None,
        media_type: Some(OCI_MANIFEST.to_string()),
        ..entry()
    };
    let body = ledger_manifest_authenticated(&KEY, REPO, &plaintext(), &stored);
    assert_eq!(
        read_stored(&KEY, REPO, &plaintext(), &body),
        Ok(stored.clone())
    );
    assert!(read_stored(&KEY, REPO, &plaintext(), &body)
        .unwrap()
        .is_manifest());
    assert_eq!(referenced_digests(&body), [Digest::of(b"{}")]);
}

/// Edits the JSON of an authentic record and serializes it again compactly.
fn tampered(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut doc: Value = serde_json::from_slice(&record()).unwrap();
    f(&mut doc);
    serde_json::to_vec(&doc).unwrap()
}

const JWE: &str = "org.opencontainers.image.enc.keys.jwe";
const PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
const RECIPIENTS: &str = "org.ocicrypt-filter.recipients";
const PLAINTEXT: &str = "org.ocicrypt-filter.plaintext";
const CIPHERTEXT: &str = "org.ocicrypt-filter.ciphertext";
const SIZE: &str = "org.ocicrypt-filter.size";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An authentic record with one layer annotation set.
fn with_layer_annotation(name: &str, value: &str) -> Vec<u8> {
    tampered(|d| d["layers"][0]["annotations"][name] = json!(value))
}

/// An authentic record with one layer annotation removed.
fn without_layer_annotation(name: &str) -> Vec<u8> {
    tampered(|d| {
        let annotations = d["layers"][0]["annotations"].as_object_mut().unwrap();
        annotations.shift_remove(name);
    })
}

/// An authentic record whose MAC annotation `f` rewrites.
fn with_mac(f: impl FnOnce(&str) -> Option<String>) -> Vec<u8> {
    tampered(|d| {
        let mac = d["annotations"][ANNOTATION_MAC]
            .as_str()
            .unwrap()
            .to_string();
        let annotations = d["annotations"].as_object_mut().unwrap();
        match f(&mac) {
            Some(new) => annotations.insert(ANNOTATION_MAC.to_string(), json!(new)),
            None => annotations.shift_remove(ANNOTATION_MAC),
        };
    })
}

fn authentic(key: &[u8; 32], repository: &str, digest: &Digest, e: &LedgerEntry) -> Vec<u8> {
    ledger_manifest_authenticated(key, repository, digest, e)
}

#[test]
fn everything_the_gateway_did_not_write_is_refused() {
    let other = Digest::of(b"another plaintext");
    let pretty = serde_json::from_slice::<Value>(&record()).unwrap();
    let manifest_entry = LedgerEntry {
        media_type: Some(OCI_MANIFEST.to_string()),
        ..entry()
    };
    let client_lookalike = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": LEDGER_ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": Digest::of(b"{}").to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": Digest::of(b"plaintext tar").to_string(), "size": 10}],
        "annotations": {PLAINTEXT: plaintext().to_string()}
    });
    let config_lookalike = json!({
        "schemaVersion": 2,
        "config": {"mediaType": LEDGER_ARTIFACT_TYPE,
                   "digest": Digest::of(b"{}").to_string(), "size": 2},
        "layers": []
    });
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "ciphertext digest changed",
            with_layer_annotation(CIPHERTEXT, &Digest::of(b"x").to_string()),
        ),
        ("size changed", with_layer_annotation(SIZE, "4243")),
        (
            "size with a leading zero",
            with_layer_annotation(SIZE, "04242"),
        ),
        ("ciphertext removed", without_layer_annotation(CIPHERTEXT)),
        (
            "the layer made the ciphertext itself",
            tampered(|d| {
                d["layers"][0]["digest"] = json!(entry().encrypted_digest.to_string());
                d["layers"][0]["size"] = json!(4242);
            }),
        ),
        ("keys.jwe changed", with_layer_annotation(JWE, "eHh4")),
        (
            "an annotation added",
            with_layer_annotation("org.opencontainers.image.enc.keys.pgp", "eHh4"),
        ),
        ("an annotation removed", without_layer_annotation(PUBOPTS)),
        (
            "recipients fingerprint changed",
            with_layer_annotation(RECIPIENTS, "000000"),
        ),
        (
            "recipients fingerprint removed",
            without_layer_annotation(RECIPIENTS),
        ),
        (
            "plaintext annotation changed",
            tampered(|d| d["annotations"][PLAINTEXT] = json!(other.to_string())),
        ),
        (
            "MAC changed",
            with_mac(|mac| {
                let first = if mac.starts_with('0') { '1' } else { '0' };
                Some(format!("{first}{}", mac.get(1..).unwrap()))
            }),
        ),
        (
            "MAC in capitals",
            with_mac(|mac| Some(mac.to_ascii_uppercase())),
        ),
        ("MAC removed", with_mac(|_| None)),
        (
            "a second layer",
            tampered(|d| {
                let l = d["layers"][0].clone();
                d["layers"].as_array_mut().unwrap().push(l);
            }),
        ),
        (
            "a subject added",
            tampered(|d| {
                d["subject"] = json!({"mediaType": OCI_MANIFEST,
                                      "digest": Digest::of(b"s").to_string(), "size": 1});
            }),
        ),
        (
            "pretty-printed",
            serde_json::to_vec_pretty(&pretty).unwrap(),
        ),
        (
            "written without a MAC",
            ledger_manifest(&plaintext(), &entry()),
        ),
        (
            "written with another key",
            authentic(&[0x5b; 32], REPO, &plaintext(), &entry()),
        ),
        (
            "another repository's",
            authentic(&KEY, "demo/other", &plaintext(), &entry()),
        ),
        (
            "another project's repository of the same name",
            authentic(&KEY, "other/app", &plaintext(), &entry()),
        ),
        ("another digest's", authentic(&KEY, REPO, &other, &entry())),
        (
            "a blob's record made a manifest's",
            with_layer_annotation("org.ocicrypt-filter.media-type", OCI_MANIFEST),
        ),
        ("a manifest's record made a blob's", {
            let mut d: Value =
                serde_json::from_slice(&authentic(&KEY, REPO, &plaintext(), &manifest_entry))
                    .unwrap();
            d["layers"][0]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove("org.ocicrypt-filter.media-type");
            serde_json::to_vec(&d).unwrap()
        }),
        (
            "a client manifest with the ledger artifactType",
            serde_json::to_vec(&client_lookalike).unwrap(),
        ),
        (
            "a client manifest with the ledger type in capitals",
            tampered(|d| d["artifactType"] = json!(LEDGER_ARTIFACT_TYPE.to_ascii_uppercase())),
        ),
        (
            "a client manifest with the ledger type as config",
            serde_json::to_vec(&config_lookalike).unwrap(),
        ),
    ];
    for (name, body) in cases {
        assert!(is_ledger_record(&body), "{name}: looks like a record");
        assert_eq!(read(&body), None, "{name}");
        assert_eq!(
            read_stored(&KEY, REPO, &plaintext(), &body),
            Err(StoredEntryError::Unauthenticated),
            "{name}"
        );
    }
    // The record read for another repository, another digest, or with another key.
    let body = record();
    assert_eq!(
        entry_from_stored_authenticated(&KEY, "demo/other", &plaintext(), &body),
        None
    );
    assert_eq!(
        entry_from_stored_authenticated(&KEY, REPO, &Digest::of(b"o"), &body),
        None
    );
    assert_eq!(
        entry_from_stored_authenticated(&[0u8; 32], REPO, &plaintext(), &body),
        None
    );

    // What the unauthenticated reader made of a forged record: a blob entry (finding 5).
    let forged = ledger_manifest(&plaintext(), &entry());
    assert_eq!(entry_from_stored(&forged), Some(entry()));
}

#[test]
fn records_of_the_superseded_format_read_as_unknown() {
    // What earlier builds wrote: the ciphertext itself as the record's layer, which kept it
    // from garbage collection for as long as the tag existed. The MAC covers the same fields,
    // so the record is authentic; it is still not read, and the layer counts as unknown (it
    // is uploaded again and its new record replaces this one).
    let legacy = tampered(|d| {
        let mut annotations = d["layers"][0]["annotations"].as_object().unwrap().clone();
        annotations.shift_remove(CIPHERTEXT);
        annotations.shift_remove(SIZE);
        d["layers"][0] = json!({
            "mediaType": LEDGER_LAYER_TYPE,
            "digest": entry().encrypted_digest.to_string(),
            "size": 4242,
            "annotations": annotations,
        });
    });
    assert!(is_ledger_record(&legacy));
    assert_eq!(
        read_stored(&KEY, REPO, &plaintext(), &legacy),
        Err(StoredEntryError::Superseded)
    );
    assert_eq!(read(&legacy), None);
}

#[test]
fn client_manifests_read_back_as_manifest_entries_only() {
    // An index child the gateway rewrote and stored under the ledger tag of the digest it was
    // pushed as: after a restart it is found again, as a manifest entry for itself.
    for (body, media_type) in [
        (
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#.to_vec(),
            "application/vnd.oci.image.index.v1+json",
        ),
        (
            br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec(),
            "application/vnd.oci.image.manifest.v1+json",
        ),
    ] {
        let pushed_as = Digest::of(b"the digest the client pushed it under");
        let got = read_stored(&KEY, REPO, &pushed_as, &body).unwrap();
        assert!(got.is_manifest());
        assert_eq!(got.media_type.as_deref(), Some(media_type));
        assert_eq!(got.encrypted_digest, Digest::of(&body));
        assert_eq!(got.size, body.len() as u64);
        assert!(got.annotations.is_empty() && got.recipients.is_none());
        assert!(!is_ledger_record(&body));
    }
    for junk in [&b""[..], b"not json", b"[1,2]", b"\"text\""] {
        assert_eq!(
            read_stored(&KEY, REPO, &plaintext(), junk),
            Err(StoredEntryError::NotJson),
            "{junk:?}"
        );
        assert!(!is_ledger_record(junk));
    }
}

fn manifest_naming(n: usize) -> Vec<u8> {
    let layers: Vec<Value> = (0..n)
        .map(|i| {
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "digest": Digest::of(&(i as u64).to_be_bytes()).to_string(), "size": 1})
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::of(b"config").to_string(), "size": 2},
        "layers": layers,
    }))
    .unwrap()
}

#[test]
fn ledger_lookups_per_manifest_are_bounded() {
    assert_eq!(DEFAULT_MAX_LEDGER_LOOKUPS, 128);
    let nothing_known = |_: &Digest| false;
    // 127 layers and a config: 128 lookups, the most a real image needs.
    let body = manifest_naming(127);
    let unknown = referenced_digests_bounded(&body, &nothing_known, 128).unwrap();
    assert_eq!(unknown.len(), 128);
    assert_eq!(unknown[0], Digest::of(b"config"));

    let body = manifest_naming(128);
    let err = referenced_digests_bounded(&body, &nothing_known, 128).unwrap_err();
    assert_eq!(
        err,
        ManifestError::TooManyLedgerLookups {
            count: 129,
            max: 128
        }
    );
    let oci = err.to_oci();
    assert_eq!(oci.code, Code::ManifestInvalid);
    for fragment in ["129", "128", "limits.max_ledger_lookups"] {
        assert!(oci.message.contains(fragment), "{}", oci.message);
    }

    // Digests already known locally cost no lookup; repeated digests count once.
    let first_ten: Vec<Digest> = (0..10u64).map(|i| Digest::of(&i.to_be_bytes())).collect();
    let known = |d: &Digest| first_ten.contains(d);
    let unknown = referenced_digests_bounded(&manifest_naming(128), &known, 128).unwrap();
    assert_eq!(unknown.len(), 119);
    let mut doc: Value = serde_json::from_slice(&manifest_naming(2)).unwrap();
    let l = doc["layers"][0].clone();
    for _ in 0..500 {
        doc["layers"].as_array_mut().unwrap().push(l.clone());
    }
    let body = serde_json::to_vec(&doc).unwrap();
    assert_eq!(
        referenced_digests_bounded(&body, &nothing_known, 3)
            .unwrap()
            .len(),
        3
    );
    assert!(referenced_digests_bounded(&body, &nothing_known, 2).is_err());
    // Not JSON: nothing to look up.
    assert_eq!(
        referenced_digests_bounded(b"{", &nothing_known, 1),
        Ok(vec![])
    );
}
