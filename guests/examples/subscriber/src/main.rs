//! Subscribes to `greetings.*` through capability `in`, then serves messages: each one is printed and kept in
//! KV capability `store` (`last` = its payload, `received` = how many so far).
//!
//!     factum start guests/target/wasm32-wasip1/release/subscriber.wasm \
//!         --cap in=msg:subscribe:greetings.* --cap store=kv:read,kv:write
//!     factum kv store          # last  hello 4 / received  4

use factum_sdk::msg::Message;

factum_sdk::on_message!(handle);

fn main() -> Result<(), factum_sdk::Error> {
    factum_sdk::msg::subscribe("in", "greetings.*")?;
    println!("subscribed to greetings.*");
    Ok(()) // returning keeps the instance serving messages through `handle`
}

fn handle(message: Message) -> factum_sdk::Result<()> {
    let received = factum_sdk::kv::get("store", "received")?
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    println!("{}: {}", message.topic, String::from_utf8_lossy(&message.payload));
    factum_sdk::kv::set("store", "last", &message.payload)?;
    factum_sdk::kv::set("store", "received", received.to_string().as_bytes())
}
