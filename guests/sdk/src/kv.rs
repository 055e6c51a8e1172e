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
struct Prefix<'a> {
    prefix: &'a str,
}

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

/// Keys starting with `prefix`, sorted.
pub fn list(capability: &str, prefix: &str) -> Result<Vec<String>> {
    call(capability, "list", &Prefix { prefix })
}
