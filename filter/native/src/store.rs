//! The process's shared store: what Envoy's shared data is to the wasm build (upload records,
//! session claims, the ledger cache, key records), here one map behind a lock that every worker
//! thread and every configuration of the process shares, with a version per key for
//! compare-and-set.
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};

use ocicrypt_core::error::OciError;
use ocicrypt_core::store::Store;

/// Values with their versions (1 for a key's first write, then one more per write).
#[derive(Default)]
pub struct SharedStore {
    map: Mutex<HashMap<String, (Vec<u8>, u32)>>,
}

/// The one store of the process: records outlive a configuration reload, as shared data does.
pub static STORE: LazyLock<SharedStore> = LazyLock::new(SharedStore::default);

impl SharedStore {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, (Vec<u8>, u32)>) -> T) -> T {
        // A panic while the lock was held left the map whole (every write is one insert or
        // remove): go on with it rather than stop every request.
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut map)
    }

    fn write(map: &mut HashMap<String, (Vec<u8>, u32)>, key: &str, value: &[u8]) {
        if value.is_empty() {
            map.remove(key);
            return;
        }
        let version = map.get(key).map_or(0, |(_, v)| *v).wrapping_add(1).max(1);
        map.insert(key.to_string(), (value.to_vec(), version));
    }
}

impl Store for SharedStore {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.with(|m| m.get(key).map(|(v, _)| v.clone()))
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), OciError> {
        self.with(|m| Self::write(m, key, value));
        Ok(())
    }

    fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        Some(self.with(|m| match m.get(key) {
            Some((v, n)) => (Some(v.clone()), *n),
            None => (None, 0),
        }))
    }

    fn set_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
        self.with(|m| {
            let fits = match m.get(key) {
                None => cas == 0 || cas == u32::MAX,
                Some((_, n)) => cas == 0 || *n == cas,
            };
            if fits {
                Self::write(m, key, value);
            }
            fits
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_set_loses_to_a_write_in_between() {
        let s = SharedStore::default();
        assert_eq!(s.get_cas("k"), Some((None, 0)));
        assert!(s.set_cas("k", b"a", u32::MAX), "absent as read: written");
        let (v, cas) = s.get_cas("k").unwrap();
        assert_eq!(v.as_deref(), Some(&b"a"[..]));
        assert!(s.set("k", b"b").is_ok());
        assert!(!s.set_cas("k", b"c", cas), "another write came between");
        assert_eq!(s.get("k").as_deref(), Some(&b"b"[..]));
        let (_, cas) = s.get_cas("k").unwrap();
        assert!(s.set_cas("k", b"c", cas));
        assert_eq!(s.get("k").as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn a_key_read_absent_is_written_only_while_still_absent() {
        let s = SharedStore::default();
        assert!(s.set("k", b"x").is_ok());
        assert!(!s.set_cas("k", b"y", u32::MAX));
        assert_eq!(s.get("k").as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn an_empty_value_removes_and_zero_writes_unconditionally() {
        let s = SharedStore::default();
        assert!(s.set("k", b"x").is_ok());
        assert!(s.set_cas("k", b"z", 0));
        assert_eq!(s.get("k").as_deref(), Some(&b"z"[..]));
        assert!(s.set("k", b"").is_ok());
        assert_eq!(s.get("k"), None);
        assert_eq!(s.get_cas("k"), Some((None, 0)));
    }

    #[test]
    fn concurrent_increments_by_compare_and_set_lose_none() {
        let s = std::sync::Arc::new(SharedStore::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        loop {
                            let (v, cas) = s.get_cas("n").unwrap();
                            let n: u32 =
                                v.map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap());
                            let cas = if cas == 0 { u32::MAX } else { cas };
                            if s.set_cas("n", (n + 1).to_string().as_bytes(), cas) {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.get("n").as_deref(), Some(&b"2000"[..]));
    }
}
