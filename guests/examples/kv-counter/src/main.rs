//! Counts in KV: once a second, reads `count` from capability `counter`, adds one, writes it back and prints
//! it. The count survives restarts of the instance (it lives in the provider, not in the instance's memory).
//!
//!     factum start guests/target/wasm32-wasip1/release/kv-counter.wasm --cap counter=kv:read,kv:write
//!     factum kv counter        # count  3

use std::time::Duration;

fn main() -> Result<(), factum_sdk::Error> {
    loop {
        let count = factum_sdk::kv::get("counter", "count")?
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        factum_sdk::kv::set("counter", "count", count.to_string().as_bytes())?;
        println!("count = {count}");
        std::thread::sleep(Duration::from_secs(1));
    }
}
