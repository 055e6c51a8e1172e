//! Publishes `hello <n>` on topic `greetings.en` through capability `out` once a second.
//!
//!     factum start guests/target/wasm32-wasip1/release/publisher.wasm --cap out=msg:publish:greetings.>

use std::time::Duration;

fn main() -> Result<(), factum_sdk::Error> {
    for n in 1u64.. {
        factum_sdk::msg::publish("out", "greetings.en", format!("hello {n}").as_bytes())?;
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}
