//! Fetches one URL through capability `web` and keeps the outcome in KV capability `store`: `status`, `bytes`
//! (body length) and `body` (its first 256 bytes), then exits. The URL is fixed at build time
//! (`FETCH_URL=… cargo build …`; default `http://127.0.0.1:8080/`), since a guest has no arguments.
//!
//!     python3 -m http.server 8080 &
//!     factum start guests/target/wasm32-wasip1/release/http-fetcher.wasm \
//!         --cap web=http:request,http:domain:127.0.0.1 --cap store=kv:write
//!     factum kv store          # status  200 ...

const URL: &str = match option_env!("FETCH_URL") {
    Some(url) => url,
    None => "http://127.0.0.1:8080/",
};

fn main() -> Result<(), factum_sdk::Error> {
    match factum_sdk::http::get("web", URL) {
        Ok(response) => {
            println!("GET {URL}: {} ({} bytes)", response.status, response.body.len());
            factum_sdk::kv::set("store", "status", response.status.to_string().as_bytes())?;
            factum_sdk::kv::set("store", "bytes", response.body.len().to_string().as_bytes())?;
            let head = response.body.get(..256).unwrap_or(&response.body);
            factum_sdk::kv::set("store", "body", head)
        }
        Err(e) => {
            // A refusal is an answer too: record it, so an operator sees why (e.g. PERMISSION_DENIED).
            eprintln!("GET {URL} failed: {e}");
            factum_sdk::kv::set("store", "error", e.to_string().as_bytes())?;
            Err(e)
        }
    }
}
