//! Key-value: each capability id is its own store (`kv:read` for [`get`]/[`list`], `kv:write` for [`set`],
//! `kv:delete` for [`delete`]).

use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::{call, Result};

#[derive(Serialize)]
struct Key<'a> {
    key: &'a str,
}

#[derive(Serialize)]
struct Set<'a> {
    key: &'a str,
    #[serde(with = "serde_bytes")]
    value: &'a [u8],
}

#[derive(Serialize)]
struct List<'a> {
    prefix: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
}

/// Most keys one `list` call answers (the host's cap and default page size).
pub const MAX_LIST_KEYS: u32 = 1000;

/// The value of `key`, if set.
pub fn get(capability: &str, key: &str) -> Result<Option<Vec<u8>>> {
    call::<_, Option<ByteBuf>>(capability, "get", &Key { key }).map(|v| v.map(ByteBuf::into_vec))
}

/// Sets `key` to `value` (≤ 1 MiB).
pub fn set(capability: &str, key: &str, value: &[u8]) -> Result<()> {
    call(capability, "set", &Set { key, value })
}

/// Deletes `key`; whether it existed.
pub fn delete(capability: &str, key: &str) -> Result<bool> {
    call(capability, "delete", &Key { key })
}

/// Every key starting with `prefix`, sorted, fetched a page ([`MAX_LIST_KEYS`]) at a time.
pub fn list(capability: &str, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    loop {
        let page = list_page(capability, prefix, keys.last().map(String::as_str), MAX_LIST_KEYS)?;
        let last = page.len() < MAX_LIST_KEYS as usize;
        keys.extend(page);
        if last {
            return Ok(keys);
        }
    }
}

/// One page: keys starting with `prefix` and after `after`, sorted, at most `limit` (1 to [`MAX_LIST_KEYS`]).
/// A page shorter than `limit` is the last.
pub fn list_page(capability: &str, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<String>> {
    call(capability, "list", &List { prefix, after, limit: Some(limit) })
}
