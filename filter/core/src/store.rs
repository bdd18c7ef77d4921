//! The one seam to the state kept between requests: upload records, session claims, the ledger
//! cache and the key records all go through it.
use crate::error::OciError;

/// Shared key-value storage between requests (Envoy shared data in the adapter, a map in tests).
pub trait Store {
    /// Current value of `key`, if any.
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Sets `key`; an empty value removes it.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), OciError>;
    /// The value of `key` (`None` when absent) with a compare-and-set token for
    /// [`Store::set_cas`]; `None` when the store fails. A store shared by concurrent writers
    /// (Envoy's shared data) must override both; the default suits a store nobody else writes.
    fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        Some((self.get(key), 0))
    }
    /// Writes `key` if nobody wrote it since `cas` was read (`u32::MAX` for a key read absent:
    /// only if still absent); `false` when another writer did, or the store failed.
    fn set_cas(&self, key: &str, value: &[u8], _cas: u32) -> bool {
        self.set(key, value).is_ok()
    }
}
