//! The ABI's serialized header map, both ways: what the host hands over for a whole header
//! map, and what a callout's headers are sent as. Pure bytes: nothing here calls the host.
use super::Pairs;

/// Reads a little-endian `u32` at `at`.
fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

/// The `len` bytes at `*at`, which must be followed by a NUL; moves `*at` past the NUL.
fn field<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(len)?;
    let value = bytes.get(*at..end)?;
    if *bytes.get(end)? != 0 {
        return None;
    }
    *at = end.checked_add(1)?;
    Some(value)
}

/// Decodes the ABI's serialized header map: a little-endian `u32` count N, then N pairs of
/// `u32` lengths (name, value), then each name and value in that order, each followed by a
/// NUL byte. `None` when the bytes do not frame exactly that way (a count or a length that
/// points past the end, a missing NUL); nothing in the input can make it panic or allocate
/// more than the input's size. Empty input is an empty map (the host's null).
pub fn parse_map(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(bytes, 0)?;
    // The length table alone must fit: bounds the count (and the allocation) by the input.
    let table_end = count.checked_mul(8)?.checked_add(4)?;
    if table_end > bytes.len() {
        return None;
    }
    let mut at = table_end;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let entry = i.checked_mul(8)?.checked_add(4)?;
        let name_len = u32_at(bytes, entry)?;
        let value_len = u32_at(bytes, entry.checked_add(4)?)?;
        let name = field(bytes, &mut at, name_len)?;
        let value = field(bytes, &mut at, value_len)?;
        pairs.push((name.to_vec(), value.to_vec()));
    }
    Some(pairs)
}

/// Encodes pairs in the ABI's serialized map format ([`parse_map`]'s input); `None` only
/// when a length does not fit a `u32`.
pub fn serialize_map(pairs: &[(&str, &[u8])]) -> Option<Vec<u8>> {
    let mut size: usize = 4;
    for (name, value) in pairs {
        size = size
            .checked_add(name.len())?
            .checked_add(value.len())?
            .checked_add(10)?;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&u32::try_from(pairs.len()).ok()?.to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&u32::try_from(name.len()).ok()?.to_le_bytes());
        out.extend_from_slice(&u32::try_from(value.len()).ok()?.to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &[u8])]) -> Pairs {
        list.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn map_round_trips_with_any_bytes() {
        let list: &[(&str, &[u8])] = &[
            (":status", b"200"),
            ("content-type", b"application/json\xff"),
            ("x-empty", b""),
            ("x-nul-free-obs-text", b"\x80\xfe caf\xe9"),
        ];
        let bytes = serialize_map(list).unwrap();
        assert_eq!(parse_map(&bytes).unwrap(), pairs(list));
        assert_eq!(parse_map(&serialize_map(&[]).unwrap()).unwrap(), vec![]);
        assert_eq!(parse_map(&[]).unwrap(), vec![]);
    }

    #[test]
    fn known_encoding() {
        // count 1, lengths (1, 2), "a\0", "bc\0"
        let bytes = [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'b', b'c', 0];
        assert_eq!(parse_map(&bytes).unwrap(), pairs(&[("a", b"bc")]));
        assert_eq!(serialize_map(&[("a", b"bc")]).unwrap(), bytes);
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = serialize_map(&[("name", b"value"), ("n2", b"v2")]).unwrap();
        // Every truncation is refused.
        for cut in 1..good.len() {
            assert!(parse_map(&good[..cut]).is_none(), "cut at {cut}");
        }
        // A count the table cannot hold (no huge allocation either).
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_map(&huge).is_none());
        // A length past the end.
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_map(&long).is_none());
        // A missing NUL terminator.
        let mut unterminated = good.clone();
        let nul = 4 + 16 + "name".len();
        assert_eq!(unterminated[nul], 0);
        unterminated[nul] = b'x';
        assert!(parse_map(&unterminated).is_none());
        // Short count word.
        assert!(parse_map(&[1, 0]).is_none());
    }

    #[test]
    fn random_and_mutated_maps_never_panic() {
        // xorshift: deterministic, no dependency.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = serialize_map(&[(":status", b"200"), ("location", b"/v2/x\xff")]).unwrap();
        for _ in 0..20_000 {
            let mut bytes = base.clone();
            let edits = next() % 4;
            for _ in 0..=edits {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            if let Some(map) = parse_map(&bytes[..cut]) {
                let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
                assert!(total <= cut);
            }
            let random: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let _ = parse_map(&random);
        }
    }
}
